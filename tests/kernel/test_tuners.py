"""Tuners on a tiny saved Llama: each trains, lowers the loss, changes only its parameters, resumes exactly;
adapters reload in peft; config keys, aliases and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swiftk.contracts.events import read, steps
from swiftk.kernel.cli import main
from swiftk.kernel.config import ModelConfig, load_config, train_config
from swiftk.kernel.errors import ConfigError, ModelLoadError
from swiftk.kernel.model import load_model
from swiftk.kernel.tuners import apply_tuner, load_trainable, quantization_config

ADDITION = "data/synthetic/addition_train.jsonl"
LORA = "lora_rank = 8\nlora_alpha = 16\nlora_dropout = 0.0\n"
TUNER_KEYS = {
    "lora": LORA + 'use_rslora = true\nmodules_to_save = ["lm_head"]',
    "qlora": LORA + 'bnb_4bit_compute_dtype = "float32"',
    "dora": LORA,
    "galore": "galore_rank = 4\ngalore_update_proj_gap = 2\ngalore_scale = 1.0",
    "freeze": 'freeze_trainable_layers = 1\nfreeze_extra_modules = ["norm"]',
}


def make_tiny_base(folder: Path) -> Path:
    """A 2-layer Llama (hidden 64) with a byte-level BPE tokenizer learnt from the addition data, saved as an HF
    folder: a "pretrained" base that adapters, merges and GGUF files can be checked against."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rows = [json.loads(line) for line in Path(ADDITION).read_text().splitlines()]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([r["prompt"] + r["completion"] for r in rows], vocab_size=300,
                            special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tuner_config(path: Path, base: Path, tuner: str, run_dir: Path, steps: int = 6) -> Path:
    path.write_text(f"""
[model]
model_id = "{base}"
[data]
train_file = "{ADDITION}"
max_length = 16
shuffle = false
[train]
tuner_strategy = "{tuner}"
{TUNER_KEYS.get(tuner, "")}
lr = 1e-2
scheduler = "constant"
batch_size = 16
max_steps = {steps}
seed = 0
precision = "fp32"
[output]
dir = "{run_dir}"
save_every = 3
keep_last = 5
[log]
progress = "none"
""")
    return path


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r.step: r.loss for r in steps(read(run_dir / "metrics.jsonl"))}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="module")
def runs(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tuner trained once, 6 steps, checkpoints at 3 and 6 (shared by the tests below)."""
    root = tmp_path_factory.mktemp("tuner_runs")
    done = {}
    for tuner in TUNER_KEYS:
        cfg = tuner_config(root / f"{tuner}.toml", base, tuner, root / tuner)
        assert main(["run", str(cfg)]) == 0, tuner
        done[tuner] = root / tuner
    return done


@pytest.mark.slow  # the first one trains every tuner (the module's shared runs)
@pytest.mark.parametrize("tuner", list(TUNER_KEYS))
def test_tuner_trains_and_resumes_exactly(tuner: str, runs: dict[str, Path], base: Path, tmp_path: Path) -> None:
    full = step_losses(runs[tuner])
    assert full[6] < full[1] - 0.3, f"{tuner}: loss did not fall: {full}"
    cfg = tuner_config(tmp_path / "c.toml", base, tuner, tmp_path / "resumed")
    assert main(["run", str(cfg), "--resume", str(runs[tuner] / "checkpoints/step-000003")]) == 0
    again = step_losses(tmp_path / "resumed")
    assert sorted(again) == [4, 5, 6] and all(again[s] == full[s] for s in again), (full, again)


EXPECTED_TRAINABLE = {  # which checkpoint tensors each tuner trains (a checkpoint holds exactly those)
    "lora": lambda n: "lora_" in n or "lm_head.modules_to_save" in n,
    "qlora": lambda n: "lora_A" in n or "lora_B" in n,
    "dora": lambda n: "lora_A" in n or "lora_B" in n or "lora_magnitude_vector" in n,
    "galore": lambda n: True,
    "freeze": lambda n: ".layers.1." in n or n == "model.norm.weight",
}


@pytest.mark.parametrize("tuner", list(TUNER_KEYS))
def test_only_the_intended_parameters_train(tuner: str, runs: dict[str, Path]) -> None:
    first = load_file(runs[tuner] / "checkpoints/step-000003/model.safetensors")
    last = load_file(runs[tuner] / "checkpoints/step-000006/model.safetensors")
    assert first and all(EXPECTED_TRAINABLE[tuner](name) for name in first), sorted(first)[:4]
    changed = [k for k in last if not torch.equal(first[k], last[k])]
    assert len(changed) >= len(last) - 2, f"{tuner}: only {len(changed)} of {len(last)} tensors changed"
    if tuner == "freeze":
        assert any(".layers.1." in n for n in first) and not any(".layers.0." in n for n in first)
    if tuner == "galore":
        assert len(first) == 2 * 9 + 3  # every weight of the 2-layer model trains


@pytest.mark.parametrize("tuner", ["lora", "qlora", "dora"])
def test_the_adapter_reloads_in_peft(tuner: str, runs: dict[str, Path], base: Path) -> None:
    """PeftModel.from_pretrained(base, final/) computes what the run's last checkpoint computes."""
    from peft import PeftModel

    cfg = load_config(runs[tuner] / "config.toml")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])

    def fresh_base() -> torch.nn.Module:
        return load_model(ModelConfig(model_id=str(base)), 0, torch.device("cpu"),
                          quantization=quantization_config(cfg.train))

    reloaded = PeftModel.from_pretrained(fresh_base(), runs[tuner] / "final").eval()
    rebuilt = apply_tuner(fresh_base(), cfg.train)
    load_trainable(rebuilt, load_file(runs[tuner] / "checkpoints/step-000006/model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, rebuilt.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_qlora_base_is_4bit_nf4_with_double_quant(base: Path) -> None:
    import bitsandbytes as bnb

    train = train_config(tuner_strategy="qlora")
    model = load_model(ModelConfig(model_id=str(base)), 0, torch.device("cpu"), quantization=quantization_config(train))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.quant_type == "nf4"
    assert layer.weight.quant_state.nested and layer.compute_dtype == torch.bfloat16
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # the head stays in full precision


def test_a_quantized_load_lets_go_of_the_checkpoint_file(base: Path, tmp_path: Path) -> None:
    """The tensors left unquantized (embeddings, norms) are copied off the safetensors mapping: a view would keep
    the whole file mapped and resident (3.8 GB beside 0.85 GB of tensors for a 1.1 B model in 4 bits)."""
    import shutil

    folder = shutil.copytree(base, tmp_path / "base")
    train = train_config(tuner_strategy="qlora")
    model = load_model(ModelConfig(model_id=str(folder)), 0, torch.device("cpu"),
                       quantization=quantization_config(train))
    kept = {name: p.detach().clone() for name, p in model.named_parameters() if p.dtype.is_floating_point}
    for file in folder.glob("*.safetensors"):  # what a view of the mapping would now read
        size = file.stat().st_size
        with file.open("r+b") as handle:
            handle.write(b"\0" * size)
    for name, p in model.named_parameters():
        if name in kept:
            assert torch.equal(p.detach(), kept[name]), f"{name} still reads the checkpoint file"


def test_8bit_lora_trains(base: Path, tmp_path: Path) -> None:
    text = tuner_config(tmp_path / "c.toml", base, "qlora", tmp_path / "run", steps=3).read_text()
    (tmp_path / "c.toml").write_text(text.replace('bnb_4bit_compute_dtype = "float32"', "quantization_bit = 8"))
    assert main(["run", str(tmp_path / "c.toml")]) == 0
    losses = step_losses(tmp_path / "run")
    assert losses[3] < losses[1]


def test_config_keys_people_know_from_llama_factory_and_ms_swift() -> None:
    train = train_config({"finetuning_type": "freeze", "freeze_layers": 3,
                                        "trainable_parameters": ["embed_tokens"]})
    assert (train.tuner_strategy, train.freeze_trainable_layers, train.freeze_extra_modules) == \
        ("freeze", 3, ["embed_tokens"])
    lora = train_config({"train_type": "lora", "lora_target": "q_proj, v_proj", "quantization_bit": 0})
    assert lora.lora_target_modules == ["q_proj", "v_proj"] and lora.quantization_bit is None
    assert train_config({"lora_target": "all"}).lora_target_modules == "all-linear"
    qlora = train_config(tuner_strategy="qlora", quantization_type="fp4", double_quantization=False)
    assert (qlora.quantization_bit, qlora.bnb_4bit_quant_type, qlora.bnb_4bit_use_double_quant) == (4, "fp4", False)
    assert train_config(tuner_strategy="dora").use_dora
    galore = train_config(tuner_strategy="galore", galore_rank=16, galore_update_interval=50)
    assert galore.optimizer == "galore_adamw"
    assert galore.optimizer_config | {"target_modules": None} == {
        "rank": 16, "update_proj_gap": 50, "scale": 0.25, "proj_type": "std", "target_modules": None}


@pytest.mark.parametrize(("train", "expected"), [
    ("quantization_bit = 3", "bitsandbytes quantizes to 4 or 8 bits"),
    ('tuner_strategy = "full"\nquantization_bit = 4', "quantization_bit: unknown key; it belongs to tuner 'dora', "
                                                   "tuner 'lora', tuner 'qlora'"),
    ('tuner_strategy = "galore"\noptimizer = "sgd"', "trains with the galore_adamw optimizer"),
    ('tuner_strategy = "full"\nmodules_to_save = ["lm_head"]', "modules_to_save: unknown key; it belongs to tuner"),
])
def test_tuner_config_errors(tmp_path: Path, train: str, expected: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\nmodel_id = "x"\n[data]\ntrain_file = "x"\n[train]\n{train}\n[output]\ndir = "x"\n')
    with pytest.raises(ConfigError, match=expected):
        load_config(cfg)


def test_galore_targets_that_match_nothing_are_refused(base: Path, tmp_path: Path, capsys) -> None:
    cfg = tuner_config(tmp_path / "c.toml", base, "galore", tmp_path / "run")
    assert main(["run", str(cfg), "--set", "train.galore_target_modules=['attention']"]) == 1
    err = capsys.readouterr().err
    assert "match none of the model's trainable matrices" in err and "q_proj" in err


def test_lora_targets_that_match_nothing_are_refused(base: Path) -> None:
    model = load_model(ModelConfig(model_id=str(base)), 0, torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="lora_target_modules.*linear layers: .*q_proj"):
        apply_tuner(model, train_config(lora_target_modules=["query_key_value"]))


def test_qlora_on_a_model_without_bnb_linear_layers_is_refused() -> None:
    from transformers import BitsAndBytesConfig

    from swiftk.kernel.model import check_quantized

    conv = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3), torch.nn.ReLU())
    with pytest.raises(ModelLoadError, match="no layer bitsandbytes can quantize.*Conv1d"):
        check_quantized(conv, BitsAndBytesConfig(load_in_4bit=True))


def test_device_map_passes_through(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model = load_model(ModelConfig(model_id=str(base), device_map="auto"), 0, torch.device("cpu"))
    assert seen["device_map"] == "auto" and next(model.parameters()).device.type == "cpu"


def test_the_qlora_example_config_validates(repo: Path) -> None:
    train = load_config(repo / "configs/qlora.toml").train
    assert (train.tuner_strategy, train.quantization_bit, train.bnb_4bit_quant_type) == ("qlora", 4, "nf4")
    assert quantization_config(train).bnb_4bit_use_double_quant


def test_the_galore_example_config_validates(repo: Path) -> None:
    train = load_config(repo / "configs/galore.toml").train
    assert (train.tuner_strategy, train.optimizer, train.optimizer_in_backward) == ("galore", "galore_adamw", True)
    assert train.max_grad_norm == 0 and train.optimizer_config["update_proj_gap"] == 50
