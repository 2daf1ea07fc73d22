"""``swiftk plan``: its parts against what they estimate (autograd's saved tensors in a real forward, accelerate's
and DeepSpeed's estimators), its layouts against the parallel engines' rules, the ms-swift claim it checks, and
its errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swiftk.kernel.config import load_config
from swiftk.kernel.plan import GIB, Gpus, Layout, PlanError, make_plan, per_gpu

from ..conftest import REPO

TINY = """
[model]
model_id = "data/tiny_tokenizer"
init = "random"
architecture = {{ model_type = "llama", hidden_size = 128, intermediate_size = 256, num_hidden_layers = 3, \
num_attention_heads = 4, num_key_value_heads = 2, vocab_size = 96, max_position_embeddings = 64, \
tie_word_embeddings = false }}
[data]
train_file = "data/synthetic/addition_train.jsonl"
max_length = 48
[train]
{train}
batch_size = 4
precision = "fp32"
[output]
dir = "runs/unused"
"""


def tiny(tmp_path: Path, train: str = 'tuner_strategy = "full"', *overrides: str):
    (tmp_path / "c.toml").write_text(TINY.format(train=train))
    return load_config(tmp_path / "c.toml", list(overrides))


def saved_in_a_real_forward(cfg) -> float:
    """Bytes autograd keeps for backward in a real CPU forward of the config's model at full length (weights
    excluded), the way the kernel runs it: to the hidden states, no logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg.model.architecture))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    alive = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if tensor.is_floating_point() and storage.data_ptr() not in weights:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
            alive.append(tensor)
        return tensor

    ids = torch.randint(0, 96, (cfg.train.batch_size, cfg.data.max_length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, logits_to_keep=torch.empty(0, dtype=torch.long))
    return float(sum(seen.values()))


def test_activations_are_what_a_real_forward_saves(tmp_path: Path) -> None:
    """Counted on the meta device with attention as the fused kernels keep it, against a real forward on CPU (whose
    SDPA is the flash kernel): within 5 %."""
    cfg = tiny(tmp_path)
    plan = make_plan(cfg, Gpus.parse("cpu"))
    counted = sum(w + s for w, s in plan.model.act_layer) + plan.model.act_other
    real = saved_in_a_real_forward(cfg)
    assert counted == pytest.approx(real, rel=0.05), (counted, real)
    assert len(plan.model.act_layer) == 3 and plan.model.layer_input == 4 * 48 * 128 * 4


def test_one_gpu_model_states_equal_accelerates_estimate(tmp_path: Path) -> None:
    """Full fine-tuning in float32 with AdamW: weights, gradients and two moments, 16 bytes a parameter, as
    `accelerate estimate-memory` counts them."""
    from accelerate.commands.estimate import estimate_training_usage

    plan = make_plan(tiny(tmp_path), Gpus.parse("1xA100"))
    memory = plan.asked_memory
    theirs = estimate_training_usage(plan.model.params * 4, "float32")
    assert memory.weights + memory.gradients + memory.optimizer == pytest.approx(
        theirs["model"] + theirs["gradients"] + theirs["optimizer"], rel=1e-6)


@pytest.mark.parametrize("gpus", [2, 8])
def test_zero3_model_states_agree_with_deepspeeds_estimator(gpus: int, tmp_path: Path) -> None:
    """DeepSpeed counts 18 bytes a parameter over the GPUs plus the largest layer gathered (fp16 weights and an
    fp32 copy); swiftk keeps float32 weights under autocast (16 bytes) and gathers a layer, the next one and the
    layer's gradients. With 24 layers the gathered ones are a small share, as in a real model."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    plan = make_plan(tiny(tmp_path, 'tuner_strategy = "full"', "model.architecture.num_hidden_layers=24"),
                     Gpus.parse(f"{gpus}xA100"))
    zero3 = dict((layout.name, memory) for layout, memory in plan.options)["fsdp"]
    ours = zero3.weights + zero3.gradients + zero3.optimizer
    _, theirs, _ = estimate_zero3_model_states_mem_needs(plan.model.params, plan.model.largest_layer,
                                                          num_gpus_per_node=gpus, cpu_offload=False)
    assert ours == pytest.approx(theirs, rel=0.15), (ours, theirs)


def test_zero2_model_states_agree_with_deepspeeds_estimator_on_two_gpus(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    plan = make_plan(tiny(tmp_path), Gpus.parse("2xA100"))
    zero2 = dict((layout.name, memory) for layout, memory in plan.options)["zero2"]
    _, theirs = estimate_zero2_model_states_mem_needs(plan.model.params, num_gpus_per_node=2, cpu_offload=False)
    assert zero2.weights + zero2.gradients + zero2.optimizer == pytest.approx(theirs, rel=0.15)


def test_tuners_and_optimizers_change_what_is_counted(tmp_path: Path) -> None:
    full = make_plan(tiny(tmp_path), None).asked_memory
    lora = make_plan(tiny(tmp_path, 'tuner_strategy = "lora"\nlora_rank = 4\nlora_dropout = 0.0'), None)
    assert 0 < lora.model.trainable < lora.model.params / 10
    assert lora.asked_memory.optimizer == pytest.approx(8 * lora.model.trainable)
    assert lora.asked_memory.gradients < full.gradients / 10
    eight_bit = make_plan(tiny(tmp_path, 'tuner_strategy = "full"\noptimizer = "adamw_8bit"'), None).asked_memory
    assert eight_bit.optimizer == pytest.approx(full.optimizer / 4)
    in_backward = make_plan(tiny(tmp_path, 'tuner_strategy = "full"\noptimizer_in_backward = true'), None)
    assert in_backward.asked_memory.gradients < full.gradients / 2
    checkpointed = make_plan(tiny(tmp_path, 'tuner_strategy = "full"\ngradient_checkpointing = true'), None)
    assert checkpointed.asked_memory.activations < full.activations


def test_layouts_divide_the_memory_as_their_engines_do(tmp_path: Path) -> None:
    plan = make_plan(tiny(tmp_path), Gpus.parse("4xA100"))
    options = {layout.name: memory for layout, memory in plan.options}
    # tp 4 would need 4 | 2 key-value heads: not offered; dp 2 x tp 2 is; 4 stages of 3 layers are not, 2 are,
    # split by tp 2 too
    assert set(options) == {"ddp", "zero2", "fsdp", "dp2xtp2", "dp2xpp2", "pp2xtp2", "device_map"}
    single = plan.asked_memory
    assert options["ddp"].weights == single.weights and options["ddp"].gradients == 2 * single.gradients
    assert options["zero2"].optimizer == pytest.approx(single.optimizer / 4)
    assert options["fsdp"].weights < single.weights
    tp2 = {layout.name: memory for layout, memory in make_plan(tiny(tmp_path), Gpus.parse("2xA100")).options}["tp2"]
    assert tp2.weights < single.weights and tp2.activations < single.activations
    assert options["dp2xtp2"].optimizer == pytest.approx(tp2.optimizer / 2)
    qlora = make_plan(tiny(tmp_path, 'tuner_strategy = "qlora"\nquantization_bit = 4'), Gpus.parse("4xA100"))
    assert {layout.name for layout, _ in qlora.options} == set(options)  # FSDP2 shards 4-bit codes, tp splits them
    dora = make_plan(tiny(tmp_path, 'tuner_strategy = "dora"'), Gpus.parse("4xA100"))
    assert {layout.name for layout, _ in dora.options} == set(options) - {"dp2xtp2", "pp2xtp2"}  # as engines allow
    cfg = tiny(tmp_path)
    pp2 = per_gpu(plan.model, Layout("pp2", 2, pp=2), cfg, 0.0, 0.0)
    pp2xtp2 = per_gpu(plan.model, Layout("pp2xtp2", 4, pp=2, tp=2), cfg, 0.0, 0.0)  # a stage's projections over tp
    assert pp2xtp2.weights < pp2.weights and pp2xtp2.activations < pp2.activations


def test_quantized_scales_are_neither_sharded_nor_quantized_again_under_tp(tmp_path: Path) -> None:
    """bitsandbytes keeps a 4-bit layer's scales beside its codes, where FSDP2 does not shard them; a tp-split NF4
    layer holds them in float32 (4 bytes per block of 64 values), not double-quantised."""
    from swiftk.kernel.plan import SCALE_BYTES, SPLIT_SCALE_BYTES, scales_beyond

    model = make_plan(tiny(tmp_path, 'tuner_strategy = "qlora"\nquantization_bit = 4'), None).model
    assert 0 < model.split_quantized <= model.quantized
    assert SCALE_BYTES[4] == pytest.approx(1 / 64 + 4 / (64 * 256))
    assert scales_beyond(model, Layout("ddp", 2, dp=2), 1) == 0.0
    assert scales_beyond(model, Layout("fsdp", 4, dp=4, shard="zero3"), 4) == \
        pytest.approx(model.quantized * SCALE_BYTES[4] * 3 / 4)
    tp2 = Layout("tp2", 2, tp=2)
    assert scales_beyond(model, tp2, 1) == pytest.approx(model.split_quantized * (SPLIT_SCALE_BYTES - SCALE_BYTES[4])
                                                         / 2)


def test_the_config_s_own_layout_is_planned(tmp_path: Path) -> None:
    three = tiny(tmp_path, 'tuner_strategy = "full"', "distributed.num_processes=8", "distributed.backend='pp'",
                 "distributed.pp_size=2", "distributed.tp_size=2")
    asked = make_plan(three, None).asked
    assert (asked.name, asked.dp, asked.pp, asked.tp, asked.shard) == ("dp2xpp2xtp2", 2, 2, 2, "zero3")
    cfg = tiny(tmp_path, 'tuner_strategy = "full"', "distributed.num_processes=2", "distributed.backend='tp'")
    plan = make_plan(cfg, None)
    assert plan.asked.name == "tp2" and plan.asked.tp == 2
    alone = per_gpu(plan.model, Layout("single", 1), cfg, 0.0, 0.0)
    assert plan.asked_memory.weights < alone.weights


def test_ms_swifts_70b_qlora_claim_on_8_a10s() -> None:
    """Llama-3-70B QLoRA on 8 x A10 (24 GB): DDP and ZeRO-2 hold the whole 4-bit model (~41 GiB) on each GPU; FSDP2,
    tp8 (each GPU an eighth of every 4-bit layer) and pp8 (each a tenth of the layers) train within 24 GiB, but
    every rank of theirs loads the whole model first; device_map, which loads each GPU's layers alone, fits."""
    done = subprocess.run([sys.executable, "-m", "swiftk", "plan", "configs/plan_llama3_70b_qlora.toml", "--gpus",
                           "8xA10", "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    assert 70e9 < plan["model"]["params"] < 71e9 and plan["model"]["quantized"] > 68e9
    fits = {option["layout"]: option["fits"] for option in plan["options"]}
    assert fits == {"ddp": False, "zero2": False, "fsdp": False, "dp4xtp2": False, "dp2xtp4": False, "tp8": False,
                    "dp4xpp2": False, "dp2xpp2xtp2": False, "pp2xtp4": False, "dp2xpp4": False, "pp4xtp2": False,
                    "pp8": False, "device_map": True}
    assert plan["best"] == "device_map"
    gib = {option["layout"]: option["per_gpu_gib"] for option in plan["options"]}
    assert 41 / 8 * 0.9 < gib["pp8"]["weights"] < 41 / 8 * 1.1  # the stages balanced by bytes: 4-bit layers, bf16 head
    # tp8: an eighth of the 4-bit codes with float32 scales (0.5625 bytes a value), the rest split or whole
    assert 68.5e9 * 0.5625 / 8 / 2**30 < gib["tp8"]["weights"] < 41 / 8 * 1.2
    assert all(gib[name]["total"] < 24 < gib[name]["load"] for name in ("fsdp", "tp8", "pp8"))
    assert gib["device_map"]["load"] < 24
    assert 30 < plan["asked"]["per_gpu_gib"]["weights"] < 45


def test_nothing_fits_and_bad_gpus_are_said(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "swiftk", "plan", "configs/plan_llama3_70b_qlora.toml", "--gpus",
                           "1xT4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "nothing fits 16 GiB: the smallest is single" in done.stdout
    with pytest.raises(PlanError, match="unknown GPU 'a11'; known: t4, v100"):
        Gpus.parse("8xA11")
    assert Gpus.parse("4x24GB").gib == 24 and Gpus.parse("2xA100-40").gib == 40 and Gpus.parse("H200").count == 1
    assert make_plan(tiny(tmp_path), Gpus.parse("cpu")).asked_memory.runtime > 100 * 2**20  # this process
    assert GIB == 2**30


def test_pipeline_stages_are_planned_as_the_engine_splits_them(tmp_path: Path) -> None:
    """Each stage holds what kernel.parallel.pp gives it (the same split, the same bytes), and the activations of
    the micro-batches its schedule keeps in flight: 1F1B's first stage pp of them, GPipe's every one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from swiftk.kernel.parallel.pp import layer_costs, parts, stage_bounds
    from swiftk.kernel.plan import stage_memory

    cfg = tiny(tmp_path, 'tuner_strategy = "full"\ngrad_accum = 4', "distributed.num_processes=2",
               "distributed.backend='pp'", "distributed.pp_schedule='gpipe'")
    plan = make_plan(cfg, Gpus.parse("2xA100"))
    assert plan.asked.name == "pp2" and (plan.asked.micro, plan.asked.schedule) == (4, "gpipe")
    assert "pp2" in {layout.name for layout, _ in plan.options}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg.model.architecture))
    causal, decoder, layers = parts(model)
    bounds = stage_bounds(layer_costs(decoder, causal, layers, "memory"), 2)
    first = [*decoder.embed_tokens.parameters(), *(p for layer in layers[:bounds[1]] for p in layer.parameters())]
    gpipe = [stage_memory(plan.model, plan.asked, cfg, 0.0, 0.0, stage) for stage in (0, 1)]
    assert gpipe[0].weights == pytest.approx(sum(4.0 * p.numel() for p in first))
    assert sum(m.weights for m in gpipe) == pytest.approx(plan.model.weight_bytes)
    one_f = dataclasses.replace(plan.asked, schedule="1f1b")
    assert stage_memory(plan.model, one_f, cfg, 0.0, 0.0, 0).activations == pytest.approx(gpipe[0].activations / 2)
    assert per_gpu(plan.model, plan.asked, cfg, 0.0, 0.0).total == max(m.total for m in gpipe)


def test_interleaved_pipelines_are_planned_per_rank(tmp_path: Path) -> None:
    """Under interleaved_1f1b each rank holds pp_stages_per_rank stages (rank r: stages r, r + pp): the same bytes
    of weights in all, and in flight the stage-micro-batches of Megatron's count (2 (pp - r - 1) + (v - 1) pp + 1,
    each 1/v of the rank's layers)."""
    from swiftk.kernel.plan import stage_memory

    cfg = tiny(tmp_path, 'tuner_strategy = "full"\ngrad_accum = 8', "distributed.num_processes=2",
               "distributed.backend='pp'", "distributed.pp_schedule='interleaved_1f1b'",
               "model.architecture.num_hidden_layers=4")
    plan = make_plan(cfg, Gpus.parse("2xA100"))
    assert (plan.asked.virtual, plan.asked.schedule) == (2, "interleaved_1f1b")
    ranks = [stage_memory(plan.model, plan.asked, cfg, 0.0, 0.0, stage) for stage in (0, 1)]
    assert sum(m.weights for m in ranks) == pytest.approx(plan.model.weight_bytes)
    one_f = [stage_memory(plan.model, dataclasses.replace(plan.asked, schedule="1f1b", virtual=1), cfg, 0.0, 0.0, s)
             for s in (0, 1)]
    # 4 equal layers, one a stage: rank 0 keeps (2 + 2 + 1) / 2 = 2.5 micro-batches of its two layers in flight
    # where 1F1B keeps 2; rank 1 (2 x 0 + 2 + 1) / 2 = 1.5 where 1F1B keeps 1 (the norm's and head's included)
    assert ranks[0].activations == pytest.approx(1.25 * one_f[0].activations)
    assert ranks[1].activations == pytest.approx(1.5 * one_f[1].activations)


def test_sequence_parallelism_splits_what_tensor_parallelism_keeps_whole(tmp_path: Path) -> None:
    """Under tp 2 a layer's attention and MLP activations are halved and its norms' and residuals' kept whole;
    with sequence_parallel those are halved too."""
    base = ('tuner_strategy = "full"', "distributed.num_processes=2", "distributed.backend='tp'")
    tp = make_plan(tiny(tmp_path, *base), Gpus.parse("2xA100")).asked_memory
    sp = make_plan(tiny(tmp_path, *base, "distributed.sequence_parallel=true"), Gpus.parse("2xA100")).asked_memory
    model = make_plan(tiny(tmp_path, *base), Gpus.parse("2xA100")).model
    whole = sum(w for w, _ in model.act_layer)
    assert whole > 0 and tp.activations - sp.activations == pytest.approx(whole / 2)
    assert (tp.weights, tp.optimizer) == (sp.weights, sp.optimizer)
