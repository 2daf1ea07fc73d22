"""Tensor parallelism (``[distributed] backend = "tp"``) on CPU (gloo): the split layers give the one process's
gradients; 2 ranks (tp 2) and 4 ranks (dp 2 x tp 2, FSDP2 over the TP groups) reproduce its loss curve and final
weights; LoRA under tp merges back to the one process's model; DPO's reference is split like the model; layouts
that cannot work are errors naming the setting."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import Replicate

from swiftk.kernel.cli import main
from swiftk.kernel.config import DistributedConfig, load_config
from swiftk.kernel.dist import DistInfo, DistributedError
from swiftk.kernel.errors import ConfigError
from swiftk.kernel.parallel import engine_class
from swiftk.kernel.parallel.tp import TensorParallel, layer_plan

from ..conftest import REPO
from .test_dist import CONFIG, assert_matches, losses, swiftk, variant

STEPS = 6


def config(path: Path, out: Path, processes: int = 1, batch: int = 32, **distributed: object) -> Path:
    """test_dist's tiny Llama with 2 key-value heads (grouped-query attention, split 2 ways), ``STEPS`` steps."""
    table = {"num_processes": processes, **distributed}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items())
    text = CONFIG.format(batch=batch, steps=STEPS, out=out, save_every=3, distributed=lines)
    path.write_text(text.replace("num_key_value_heads = 4", "num_key_value_heads = 2"))
    return path


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process run, in this process."""
    tmp = tmp_path_factory.mktemp("one")
    assert main(["run", str(config(tmp / "c.toml", tmp / "run"))]) == 0
    return tmp / "run"


def assert_same_weights(got: Path, want: Path, name: str = "model.safetensors") -> None:
    a, b = load_file(got / name), load_file(want / name)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=key)


# ------------------------------------------------------------------------------------------ the split layers


SPLIT = """
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM
from swiftk.kernel.config import DistributedConfig
from swiftk.kernel.dist import DistInfo
from swiftk.kernel.parallel.tp import TensorParallel, split

dist.init_process_group("gloo", init_method=sys.argv[1], rank=int(sys.argv[2]), world_size=2)
torch.manual_seed(0)
width = 128 if sys.argv[3] == "qlora" else 64  # qlora: each rank's input columns whole 4-bit blocks (64)
biased = sys.argv[3] == "qlora"  # and biases on every projection: a column split cuts them, a row split adds one
config = LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=50, tie_word_embeddings=sys.argv[3] == "tied",
                     attention_bias=biased, mlp_bias=biased)
whole, model = LlamaForCausalLM(config), None
for module in whole.modules():
    if isinstance(module, torch.nn.Linear) and module.bias is not None:
        torch.nn.init.normal_(module.bias)  # not the zeros they start from
if sys.argv[3] == "qlora":  # as kernel.model.load_quantized builds it: written out, loaded back in NF4
    import tempfile
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig
    folder = tempfile.mkdtemp()
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in whole.state_dict().items()}, f"{folder}/model.safetensors",
              metadata={"format": "pt"})
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    whole = LlamaForCausalLM.from_pretrained(folder, quantization_config=nf4, device_map={"": "cpu"},
                                             dtype=torch.float32)
if sys.argv[3] in ("lora", "qlora"):
    from peft import LoraConfig, get_peft_model
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    whole = get_peft_model(whole, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
import copy
model = copy.deepcopy(whole)
sequence = sys.argv[4] == "sp"
split(model, init_device_mesh("cpu", (2,)), 2, 1, sequence)
ids = torch.randint(0, 50, (4, 15 if sequence else 16), generator=torch.Generator().manual_seed(1))  # 15: uneven
for m in (whole, model):
    m(input_ids=ids, labels=ids).loss.backward()
engine = TensorParallel(DistInfo(rank=int(sys.argv[2]), world_size=2), DistributedConfig(backend="tp", num_processes=2))
engine.clip_grad_norm([p for p in model.parameters() if p.grad is not None], None)  # sums partial gradients once
assert not any(pl.is_partial() for p in model.parameters() if isinstance(p.grad, DTensor) for pl in p.grad.placements)
want = dict(whole.named_parameters())
split = [n for n, p in model.named_parameters() if isinstance(p, DTensor) and p.requires_grad
         and any(pl.is_shard() for pl in p.placements)]
worst = max(float(((p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) - want[n].grad).abs().max())
            for n, p in model.named_parameters() if p.grad is not None)
codes = [sum(m.weight.numel() for m in m.modules() if type(m).__name__ == "Linear4bit") for m in (model, whole)]
print("RESULT", len(split), worst, codes[0] / max(1, codes[1]))
"""


@pytest.mark.parametrize("sequence", ["", "sp"])
@pytest.mark.parametrize(("tuner", "split"), [("full", 16), ("tied", 15), ("lora", 14), ("qlora", 14)])
def test_split_layers_give_the_whole_models_gradients(tuner: str, split: int, sequence: str, tmp_path: Path) -> None:
    """Every projection the model's plan names is split (LoRA: the base layer and the adapter matrix on the same
    side; QLoRA: the NF4 base layers too, each rank holding half of their 4-bit codes), the embeddings and the LM head
    by vocabulary (tied ones staying one tensor), and the gradients of split and whole tensors equal the unsplit
    model's; with sequence parallelism too (the norms and the residual stream split by positions, 15 of them:
    uneven), once the norms' partial gradients are summed."""
    script = tmp_path / "split.py"
    script.write_text(SPLIT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, str(script), f"tcp://127.0.0.1:{port}", str(rank), tuner, sequence],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    for out in outputs:
        found = re.search(r"RESULT (\d+) (\S+) (\S+)", out)
        assert found, out
        assert float(found[3]) == (0.5 if tuner == "qlora" else 0.0), out
        # 2 layers x 7 projections, the embeddings and the head (one tensor when tied); LoRA: 7 matrices of each
        # layer's adapters are split (B of 5, A of 2), the frozen embeddings and head too (not counted)
        assert int(found[1]) == split, out
        assert float(found[2]) < 1e-6, out


def test_the_plan_covers_lora_wrapped_projections() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=40))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    plan = layer_plan(peft_model, 2)
    names = {name.removeprefix("base_model.model.model.layers.0."): type(style).__name__
             for name, style in plan.items()}
    assert names["self_attn.q_proj.base_layer"] == names["self_attn.q_proj.lora_B.default"] == "ColwiseParallel"
    assert names["self_attn.o_proj.base_layer"] == names["self_attn.o_proj.lora_A.default"] == "RowwiseParallel"
    assert names["mlp.up_proj"] == "ColwiseParallel" and names["mlp.down_proj"] == "RowwiseParallel"
    assert "self_attn.q_proj.lora_A.default" not in names
    # by vocabulary: the embeddings' rows (each rank looks up its own) and the head's, its logits gathered whole
    embed, head = plan["base_model.model.model.embed_tokens"], plan["base_model.model.lm_head"]
    assert (type(embed).__name__, type(head).__name__) == ("RowwiseParallel", "ColwiseParallel")
    assert embed.input_layouts == (Replicate(),) and head.output_layouts == (Replicate(),)


# ------------------------------------------------------------------------------------------ bad layouts


def test_layouts_that_cannot_work_are_named() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=6, num_key_value_heads=3, vocab_size=40))
    with pytest.raises(DistributedError, match=r"tp_size = 2 does not divide the model's num_key_value_heads = 3"):
        layer_plan(llama, 2)
    with pytest.raises(DistributedError, match=r"tp_size = 4 does not divide the model's num_attention_heads = 6 "
                                               r"and num_key_value_heads = 3"):
        layer_plan(llama, 4)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=40))
    with pytest.raises(DistributedError, match=r"gpt2 models declare no tensor-parallel plan .* use backend = "
                                               r"'fsdp' or 'ddp'"):
        layer_plan(gpt2, 2)
    options = DistributedConfig(backend="tp", num_processes=4, tp_size=3)
    assert engine_class("tp").problems(options) == [
        "[distributed] tp_size = 3 does not divide the 4 processes (num_processes = 4 x nnodes = 1): use a divisor "
        "of 4"]
    across = DistributedConfig(backend="tp", num_processes=2, nnodes=2, node_rank=0, master_port=29500, tp_size=4)
    (problem,) = engine_class("tp").problems(across)
    assert "tp_size = 4 would split a layer across machines" in problem
    with pytest.raises(ValueError, match="tp_size: only for backend = 'tp'"):
        DistributedConfig(backend="fsdp", tp_size=2)


def test_a_tp_group_reads_one_batch() -> None:
    """Ranks 0-1 and 2-3 are TP groups: they read the halves of the data, and a sum over all ranks counts each
    group's batch twice."""
    options = DistributedConfig(backend="tp", num_processes=4, tp_size=2)
    shards = [TensorParallel(DistInfo(rank=r, world_size=4), options).data_shard for r in range(4)]
    assert shards == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert TensorParallel(DistInfo(rank=0, world_size=4), options).replicas == 2
    pure = TensorParallel(DistInfo(rank=1, world_size=2), DistributedConfig(backend="tp", num_processes=2))
    assert pure.data_shard == (0, 1) and pure.tp_size == 2


def test_sequence_parallelism_names_layers_it_cannot_split() -> None:
    """Gemma2's layers hold four norms (two more than the layout sequence parallelism splits): an error naming
    the model and the setting, before any process group is touched."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from swiftk.kernel.parallel.tp import sequence_plan

    model = Gemma2ForCausalLM(Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2, head_dim=16, vocab_size=64))
    with pytest.raises(DistributedError, match="sequence_parallel: gemma2 decoder layers .* set sequence_parallel"):
        sequence_plan(model, layer_plan(model, 2))


def test_the_tiny_tp_example_config_validates() -> None:
    """configs/tiny_tp.toml: tp over 2 processes with sequence parallelism, nothing its engine refuses; the flag
    belongs to tp alone."""
    cfg = load_config(REPO / "configs" / "tiny_tp.toml")
    assert (cfg.distributed.backend, cfg.distributed.sequence_parallel) == ("tp", True)
    assert TensorParallel.problems(cfg.distributed) == [] and TensorParallel.run_problems(cfg) == []
    with pytest.raises(ValueError, match="sequence_parallel: only for backend = 'tp'"):
        DistributedConfig(backend="ddp", sequence_parallel=True)


def test_device_method_tp_is_the_tp_backend(tmp_path: Path) -> None:
    from swiftk.kernel.parallel.config import apply_device

    path = config(tmp_path / "c.toml", tmp_path / "run", processes=2)
    path.write_text(path.read_text() + '[device]\nparallel_method = "tp"\nnum_gpus = 2\n')
    cfg = load_config(path)
    assert apply_device(cfg) == [] and (cfg.distributed.backend, cfg.distributed.num_processes) == ("tp", 2)


@pytest.mark.parametrize(("change", "message"), [
    ('tuner_strategy = "qlora"\nquantization_bit = 8', r"quantization_bit = 8: bitsandbytes' 8-bit layers cannot be "
                                                        r"split over ranks under backend = 'tp'; use quantization_bit"),
    ('tuner_strategy = "dora"', r"tuner_strategy = 'dora' with DoRA: its magnitude vectors are not split yet"),
], ids=["8-bit", "dora"])
def test_tuners_whose_layers_cannot_split_stop_before_launching(change: str, message: str, tmp_path: Path) -> None:
    from swiftk.kernel.run import Options, prepare

    path = config(tmp_path / "c.toml", tmp_path / "run", processes=2, backend="tp")
    path.write_text(path.read_text().replace('tuner_strategy = "full"', change))
    with pytest.raises(ConfigError, match=message):
        prepare(Options(config=str(path), overrides=[]))


def test_tp_size_that_does_not_divide_the_processes_stops_before_launching(tmp_path: Path) -> None:
    from swiftk.kernel.run import Options, prepare

    path = config(tmp_path / "c.toml", tmp_path / "run", processes=2, backend="tp", tp_size=4)
    with pytest.raises(ConfigError, match=r"tp_size = 4 does not divide the 2 processes \(num_processes = 2"):
        prepare(Options(config=str(path), overrides=[]))


# ------------------------------------------------------------------------------------------ whole runs


@pytest.mark.parametrize("sequence", [False, True])
def test_tp2_reproduces_one_process(sequence: bool, one: Path, tmp_path: Path) -> None:
    """Both ranks read the whole batch of 32; the loss curve and the final weights are the one process's. The loss
    is scored from the hidden states on each rank's vocabulary rows (no gathered logits), as one process scores
    them from its whole head. With sequence parallelism too (the norms' weights trained from each rank's
    positions, their gradients summed)."""
    done = swiftk(str(config(tmp_path / "c.toml", tmp_path / "run", processes=2, backend="tp",
                             **({"sequence_parallel": True} if sequence else {}))))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "steps of 32 samples (batch_size 32 x grad_accum 1)" in done.stdout
    assert "chunked loss off" not in done.stdout + done.stderr
    assert_matches(losses(tmp_path / "run"), losses(one))
    assert_same_weights(tmp_path / "run/final", one / "final")


@pytest.mark.slow
def test_a_tp2_checkpoint_resumes_in_one_process_and_under_ddp(one: Path, tmp_path: Path) -> None:
    """Checkpoints hold whole tensors: tp2's step 3 continues exactly in one process (batch 32) and under DDP on 2
    ranks (batch 16 each: the same global batch), and one process's under tp2, with the optimizer state laid out
    again for each engine. A global batch that changes is refused, naming the batch_size that continues it."""
    done = swiftk(str(config(tmp_path / "c.toml", tmp_path / "tp2", processes=2, backend="tp")))
    assert done.returncode == 0, done.stdout + done.stderr
    shutil.rmtree(tmp_path / f"tp2/checkpoints/step-{STEPS:06d}")
    for name, processes, batch, backend in (("alone", 1, 32, "ddp"), ("ddp2", 2, 16, "ddp"), ("bad", 1, 16, "ddp")):
        shutil.copytree(tmp_path / "tp2", tmp_path / name)
        cfg = config(tmp_path / f"{name}.toml", tmp_path / name, processes=processes, batch=batch, backend=backend)
        resumed = swiftk(str(cfg), "--resume")
        if name == "bad":
            assert resumed.returncode != 0
            assert "set [train] batch_size = 32 to continue it exactly" in resumed.stdout + resumed.stderr
            continue
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "resuming a tp checkpoint of 2 processes as" in resumed.stdout
        assert_matches(losses(tmp_path / name), losses(one))
    # and back: the one process's checkpoint (optimizer state by index) continues under tp2 (by name, split)
    shutil.copytree(one, tmp_path / "to_tp")
    shutil.rmtree(tmp_path / f"to_tp/checkpoints/step-{STEPS:06d}")
    cfg = config(tmp_path / "to_tp.toml", tmp_path / "to_tp", processes=2, backend="tp")
    resumed = swiftk(str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming a none checkpoint of 1 process as tp (tp_size 2) on 2" in resumed.stdout
    assert_matches(losses(tmp_path / "to_tp"), losses(one))


@pytest.mark.slow
@pytest.mark.parametrize("sequence", [False, True])
def test_dp2_by_tp2_reproduces_one_process(sequence: bool, tmp_path: Path) -> None:
    """4 ranks: two TP groups of 2, each reading half of the batch, their layers sharded by FSDP2 between them
    (the 128-row embeddings and head split by vocabulary too: 2-D shards), with and without sequence
    parallelism; a resume from the middle replays the same steps."""
    def wide(path: Path) -> Path:  # vocabulary rows that divide over the 4 ranks
        path.write_text(path.read_text().replace("num_key_value_heads = 2,", "num_key_value_heads = 2, "
                                                 "vocab_size = 128,"))
        return path

    one = tmp_path / "one"
    assert main(["run", str(wide(config(tmp_path / "one.toml", one)))]) == 0
    done = swiftk(str(wide(config(tmp_path / "c.toml", tmp_path / "run", processes=4, batch=16, backend="tp",
                                  tp_size=2, **({"sequence_parallel": True} if sequence else {})))), timeout=360)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "steps of 32 samples (batch_size 16 x grad_accum 1 x 2 data-parallel groups)" in done.stdout
    assert_matches(losses(tmp_path / "run"), losses(one))
    assert_same_weights(tmp_path / "run/final", one / "final")
    # the checkpoint of step 3 (split and sharded weights and optimizer state gathered whole) resumes exactly
    shutil.rmtree(tmp_path / f"run/checkpoints/step-{STEPS:06d}")
    resumed = swiftk(str(tmp_path / "c.toml"), "--resume", timeout=360)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "from step 3" in resumed.stdout
    assert_matches(losses(tmp_path / "run"), losses(one))


@pytest.mark.slow
def test_two_nodes_each_a_tp_group_reproduce_one_process(one: Path, tmp_path: Path) -> None:
    """Two `swiftk run`s of 2 processes each at one loopback rendezvous: tp inside each "node", data parallel (FSDP2)
    across them, as on two machines."""
    from swiftk.kernel import launch

    port = launch.free_port("127.0.0.1")
    cfg = config(tmp_path / "c.toml", tmp_path / "run", processes=2, batch=16, backend="tp", tp_size=2, nnodes=2,
                 master_port=port, join_timeout_s=120)
    nodes = [swiftk(str(cfg), f"--set=distributed.node_rank={rank}", wait=False) for rank in (0, 1)]
    outputs = [node.communicate(timeout=360)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "x 2 data-parallel groups" in outputs[0]
    assert_matches(losses(tmp_path / "run"), losses(one))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "dpo", "lora+sp"])
def test_lora_and_dpo_under_tp2_reproduce_one_process(kind: str, tmp_path: Path) -> None:
    """LoRA's adapters split with their base layers, merged back (--merge) to the one process's model, with and
    without sequence parallelism; DPO's frozen reference split like the model."""
    tuner, sequence = kind.removesuffix("+sp"), kind.endswith("+sp")
    single = variant(config(tmp_path / "one.toml", tmp_path / "one"), **{tuner: True})
    assert main(["run", str(single), "--merge"]) == 0
    double = variant(config(tmp_path / "two.toml", tmp_path / "two", processes=2, backend="tp",
                            **({"sequence_parallel": True} if sequence else {})), **{tuner: True})
    done = swiftk(str(double), "--merge")
    assert done.returncode == 0, done.stdout + done.stderr
    assert_matches(losses(tmp_path / "two"), losses(tmp_path / "one"))
    if tuner == "lora":
        assert_same_weights(tmp_path / "two/final", tmp_path / "one/final", "adapter_model.safetensors")
        assert_same_weights(tmp_path / "two/merged", tmp_path / "one/merged")


def qlora(path: Path) -> Path:
    """The QLoRA variant, 128 wide (each rank's half of a row-split projection's input is whole 64-value NF4 blocks)
    and dequantized to float32 for each matmul (the one process's bfloat16 products round differently from a
    split's partial sums)."""
    text = variant(path, qlora=True).read_text()
    text = text.replace("hidden_size = 64, intermediate_size = 128", "hidden_size = 128, intermediate_size = 256")
    path.write_text(text.replace("quantization_bit = 4", 'quantization_bit = 4\nbnb_4bit_compute_dtype = "float32"'))
    return path


@pytest.mark.slow
def test_qlora_under_tp2_and_dp2_by_tp2_reproduces_one_process(tmp_path: Path) -> None:
    """QLoRA's NF4 base split over the TP group (each rank's rows or columns quantized again, the same codes and
    scales): the loss curve, the adapter and the merged model are the one process's; under dp 2 x tp 2 too, FSDP2
    sharding the adapters and the 4-bit codes over the TP groups, and a resume from the middle replays the same
    steps."""
    def wide(path: Path) -> Path:  # vocabulary rows that divide over the 4 ranks
        path.write_text(path.read_text().replace("num_key_value_heads = 2,", "num_key_value_heads = 2, "
                                                 "vocab_size = 128,"))
        return path

    assert main(["run", str(qlora(config(tmp_path / "one.toml", tmp_path / "one"))), "--merge"]) == 0
    done = swiftk(str(qlora(config(tmp_path / "two.toml", tmp_path / "two", processes=2, backend="tp"))), "--merge")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(qlora)" in done.stdout
    assert_matches(losses(tmp_path / "two"), losses(tmp_path / "one"))
    assert_same_weights(tmp_path / "two/final", tmp_path / "one/final", "adapter_model.safetensors")
    assert_same_weights(tmp_path / "two/merged", tmp_path / "one/merged")

    assert main(["run", str(wide(qlora(config(tmp_path / "one128.toml", tmp_path / "one128"))))]) == 0
    four = wide(qlora(config(tmp_path / "four.toml", tmp_path / "four", processes=4, batch=16, backend="tp",
                             tp_size=2)))
    done = swiftk(str(four), timeout=360)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "x 2 data-parallel groups" in done.stdout
    assert_matches(losses(tmp_path / "four"), losses(tmp_path / "one128"))
    assert_same_weights(tmp_path / "four/final", tmp_path / "one128/final", "adapter_model.safetensors")
    shutil.rmtree(tmp_path / f"four/checkpoints/step-{STEPS:06d}")
    resumed = swiftk(str(four), "--resume", timeout=360)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "from step 3" in resumed.stdout
    assert_matches(losses(tmp_path / "four"), losses(tmp_path / "one128"))
