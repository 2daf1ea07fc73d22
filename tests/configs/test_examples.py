"""configs/examples/ run as written: the ms-swift-style configs from the [architecture] issue, with only the
model table pointed at the tiny random-init model (the examples name the local SmolLM2), for a few steps.
The TOML twin of each example parses into the same config as its YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from swiftk.contracts.events import StepEvent, of_kind, read
from swiftk.kernel.cli import main
from swiftk.kernel.config import load_config

from ..conftest import REPO

EXAMPLES = REPO / "configs" / "examples"
TINY_MODEL = {"model_id": "data/tiny_tokenizer", "init": "random", "architecture": {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
    "tie_word_embeddings": False}}


def on_tiny_model(example: str, tmp_path: Path) -> Path:
    """The example with its model ids (and only those) pointed at the tiny model."""
    raw = yaml.safe_load((EXAMPLES / example).read_text())
    ids = {k: TINY_MODEL["model_id"] for k in ("ref_model_id",) if k in raw["model"]}
    raw["model"] = {**TINY_MODEL, **ids}
    path = tmp_path / example
    path.write_text(yaml.safe_dump(raw))
    return path


def train(config: Path, tmp_path: Path, steps: int = 3) -> list[StepEvent]:
    assert main(["run", str(config), "--set", f"train.max_steps={steps}", "--set", f'output.dir="{tmp_path / "run"}"',
                 "--set", 'log.progress="none"']) == 0
    return of_kind(read(tmp_path / "run" / "metrics.jsonl"), StepEvent)


def test_focal_loss_from_a_plugin_file_with_its_loss_config(tmp_path: Path) -> None:
    rows = train(on_tiny_model("focal_loss.yaml", tmp_path), tmp_path)
    assert len(rows) == 3 and rows[-1].loss < rows[0].loss


def test_dpo_on_a_named_dataset_in_hh_rlhf_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hh-rlhf transcripts are found through dataset_path, converted into pairs, and trained with dpo; the
    reference named like the model is the base as loaded, so the first loss is ln 2."""
    monkeypatch.setenv("SWIFTK_CACHE", str(tmp_path / "cache"))
    rows = train(on_tiny_model("dpo_hh_rlhf.yaml", tmp_path), tmp_path)
    assert rows[0].loss == pytest.approx(0.6931, abs=2e-3) and "rewards/margins" in rows[0].metrics
    saved = load_config(tmp_path / "run" / "config.toml")
    assert saved.train.stage == "dpo" and saved.data.dataset_name == "hh-rlhf" and saved.data.train_file is None


@pytest.mark.slow
def test_qlora_on_four_devices_runs_as_four_cpu_processes_here(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what a machine without CUDA sees
    rows = train(on_tiny_model("qlora_ddp.yaml", tmp_path), tmp_path, steps=2)
    assert "no CUDA device: running 4 CPU processes (gloo) for [device] num_gpus = 4" in capsys.readouterr().err
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-000002" / "meta.json").read_text())
    assert len(rows) == 2 and meta["world_size"] == 4 and meta["tuner_strategy"] == "qlora"


@pytest.mark.parametrize("example", ["focal_loss", "qlora_ddp", "dpo_hh_rlhf"])
def test_toml_twin_is_the_same_config(example: str) -> None:
    from_yaml = load_config(EXAMPLES / f"{example}.yaml").model_dump()
    from_toml = load_config(EXAMPLES / f"{example}.toml").model_dump()
    assert {k: v for k, v in from_yaml.items() if k != "output"} == \
        {k: v for k, v in from_toml.items() if k != "output"}


def test_a_config_without_output_goes_to_runs_config_name() -> None:
    assert load_config(EXAMPLES / "dpo_hh_rlhf.yaml").output.dir == str(Path("runs") / "dpo_hh_rlhf")
