"""`swiftk export`: merged folders that generate what the adapter generated, bitsandbytes folders that reload,
GGUF files whose logits match, and the errors for what cannot be exported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swiftk.kernel.cli import main
from swiftk.kernel.config import ModelConfig, load_config
from swiftk.kernel.errors import SwiftkError
from swiftk.kernel.model import load_model
from swiftk.kernel.tuners import quantization_config

from .test_tuners import make_tiny_base, tuner_config

PROMPT = "12+34="


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export_runs")
    base = make_tiny_base(root / "base")
    done = {"base": base}
    for tuner in ("lora", "qlora", "full"):
        assert main(["run", str(tuner_config(root / f"{tuner}.toml", base, tuner, root / tuner, steps=4))]) == 0
        done[tuner] = root / tuner
    return done


def adapter_model(run_dir: Path, base: Path) -> torch.nn.Module:
    """What the run trained, loaded the way peft users do: base (quantized as in training) + final/."""
    from peft import PeftModel

    quantization = quantization_config(load_config(run_dir / "config.toml").train)
    model = load_model(ModelConfig(model_id=str(base)), 0, torch.device("cpu"), quantization=quantization)
    return PeftModel.from_pretrained(model, run_dir / "final").eval()


def greedy(model: torch.nn.Module, tokenizer, new_tokens: int = 8) -> list[int]:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.slow  # the first one trains the module's shared runs
@pytest.mark.parametrize("tuner", ["lora", "qlora"])
def test_merged_folder_generates_what_the_adapter_generated(tuner: str, runs: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["export", str(runs[tuner]), "--merge", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m/model.safetensors").is_file() and not (tmp_path / "m/adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert not hasattr(merged.config, "quantization_config")
    assert greedy(merged, tokenizer) == greedy(adapter_model(runs[tuner], runs["base"]), tokenizer)


@pytest.mark.parametrize(("kind", "layer"), [("bnb-nf4", "Linear4bit"), ("bnb-int8", "Linear8bitLt")])
def test_bitsandbytes_folder_reloads_quantized(kind: str, layer: str, runs: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert main(["export", str(runs["full"]), "--quantize", kind, "--out", str(tmp_path / "q")]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    assert type(reloaded.model.layers[0].mlp.up_proj).__name__ == layer
    full = AutoModelForCausalLM.from_pretrained(runs["full"] / "final").eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        a, b = full(ids).logits.flatten(), reloaded.eval()(ids).logits.float().flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_gguf_reads_back_in_transformers(kind: str, runs: dict[str, Path], tmp_path: Path) -> None:
    """f16: the logits match closely; q8_0: the top-1 tokens agree; the tokenizer encodes alike."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["export", str(runs["lora"]), "--gguf", kind, "--out", str(tmp_path / "g")]) == 0
    assert main(["export", str(runs["lora"]), "--merge", "--out", str(tmp_path / "m")]) == 0
    (file,) = (tmp_path / "g").glob("*.gguf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    from_gguf = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file=file.name)
    text = PROMPT + "46 and 99+99=198"
    assert from_gguf(text)["input_ids"] == tokenizer(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=file.name, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, want = model(ids).logits, merged(ids).logits
    if kind == "f16":
        assert (got - want).abs().max() < 5e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_merging_a_run_without_an_adapter_is_refused(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert main(["export", str(runs["full"]), "--merge", "--out", str(tmp_path / "m")]) == 1
    assert "has no adapter to merge" in capsys.readouterr().err and not (tmp_path / "m").exists()


@pytest.mark.parametrize("kind", ["gptq", "awq", "fp8"])
def test_gptq_awq_fp8_say_what_to_install(kind: str, runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert main(["export", str(runs["lora"]), "--quantize", kind, "--out", str(tmp_path / "q")]) == 1
    assert "pip install llmcompressor" in capsys.readouterr().err


def test_export_refuses_a_non_empty_out_and_a_non_run(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/x").write_text("x")
    assert main(["export", str(runs["lora"]), "--merge", "--out", str(tmp_path / "busy")]) == 1
    assert main(["export", str(tmp_path), "--merge", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "not a swiftk run directory" in err


def test_gguf_needs_a_byte_level_bpe_tokenizer() -> None:
    from swiftk.kernel.export import write_tokenizer
    from swiftk.kernel.tiny import build_char_tokenizer

    with pytest.raises(SwiftkError, match="byte-level BPE"):
        write_tokenizer(None, build_char_tokenizer(), 103, None)
