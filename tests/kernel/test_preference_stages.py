"""Preference stages end to end on the tiny model: DPO (frozen copy, LoRA with adapters off, precomputed
reference), SimPO, ORPO, CPO, KTO and the reward model; their metrics; the first DPO step's loss is ln 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from swiftk.contracts.events import EvalEvent, Event, StepEvent, of_kind, read
from swiftk.kernel.cli import main

REPO = Path(__file__).resolve().parents[2]


def run(tmp_path: Path, *sets: str, steps: int = 6) -> list[Event]:
    """configs/tiny_dpo.toml under ``sets``; for another stage, without its dpo-only key."""
    config = tmp_path / "tiny_dpo.toml"
    text = (REPO / "configs" / "tiny_dpo.toml").read_text()
    if any(item.startswith("train.stage=") for item in sets):
        text = "\n".join(line for line in text.splitlines() if not line.startswith("precompute_ref_logps"))
    config.write_text(text)
    args = ["run", str(config), "--set", f"train.max_steps={steps}", "--set", "eval.every=3",
            "--set", f'output.dir="{tmp_path / "run"}"', "--set", 'log.progress="none"', "--set", "train.batch_size=8",
            "--overwrite"]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    return read(tmp_path / "run" / "metrics.jsonl")


def steps(lines: list[Event]) -> list[StepEvent]:
    return of_kind(lines, StepEvent)


@pytest.mark.parametrize("sets", [
    ("train.precompute_ref_logps=true",),  # frozen copy, scored once before training
    ("train.precompute_ref_logps=false",),  # frozen copy, a reference forward every step
    ("train.precompute_ref_logps=false", 'train.tuner_strategy="lora"', "train.lora_rank=8"),  # adapters off
])
def test_dpo_starts_at_ln2_and_logs_its_rewards(tmp_path: Path, sets: tuple[str, ...]) -> None:
    """At step 1 the policy is the reference, so every margin is 0 and the sigmoid loss is -log s(0) = ln 2."""
    lines = run(tmp_path, *sets)
    first = steps(lines)[0]
    assert first.loss == pytest.approx(math.log(2), rel=2e-3)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected"} <= set(first.metrics)
    assert abs(first.metrics["rewards/margins"]) < 1e-2
    evals = of_kind(lines, EvalEvent)
    assert evals and 0 <= evals[-1].metrics["eval_rewards/accuracies"] <= 1 and "eval_loss" in evals[-1].metrics


@pytest.mark.parametrize("stage, extra", [("simpo", "logps/chosen"), ("orpo", "log_odds_ratio"),
                                          ("cpo", "nll_loss")])
def test_reference_free_stages_train(tmp_path: Path, stage: str, extra: str) -> None:
    lines = run(tmp_path, f'train.stage="{stage}"', 'train.loss_type="cross_entropy"', "train.beta=0.5")
    rows = steps(lines)
    assert len(rows) == 6 and all(math.isfinite(r.loss) for r in rows) and extra in rows[0].metrics
    assert all(0 <= r.metrics["rewards/accuracies"] <= 1 for r in rows)
    assert of_kind(lines, EvalEvent)[-1].metrics["eval_loss"] > 0


def test_sft_rows_under_a_preference_stage_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["run", "configs/tiny_dpo.toml", "--set", 'data.train_file="data/synthetic/addition_train.jsonl"',
                 "--set", f'output.dir="{tmp_path / "run"}"'])
    assert code != 0
    assert "addition_train.jsonl:1: preference row has no 'chosen' or 'rejected' field" in capsys.readouterr().err


def test_precompute_is_a_dpo_option(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A stage's own key is unknown under another stage, and the message says whose key it is."""
    assert main(["run", "configs/tiny_dpo.toml", "--set", 'train.stage="kto"']) == 2
    assert "[train] precompute_ref_logps: unknown key; it belongs to stage 'dpo'" in capsys.readouterr().err


def test_a_reward_model_trains_on_pairs_and_saves_its_head(tmp_path: Path) -> None:
    args = ["run", "configs/tiny_rm.toml", "--set", "train.max_steps=4", "--set", "eval.every=2", "--set",
            "train.batch_size=8", "--set", f'output.dir="{tmp_path / "run"}"', "--set", 'log.progress="none"']
    assert main(args) == 0
    lines = read(tmp_path / "run" / "metrics.jsonl")
    first = steps(lines)[0]
    assert first.loss == pytest.approx(math.log(2), abs=0.05)  # a fresh head scores everything about alike
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies"} <= set(first.metrics)
    assert "eval_rewards/accuracies" in of_kind(lines, EvalEvent)[-1].metrics
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final")
    assert reloaded(input_ids=torch.tensor([[1, 5, 6, 7]])).logits.shape == (1, 1)  # one score per sequence


@pytest.mark.parametrize("stage", ["dpo", "simpo", "orpo", "cpo", "kto", "rm"])
def test_each_stage_config_checks(stage: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", f"configs/tiny_{stage}.toml", "--print-config"]) == 0
    assert f'stage = "{stage}"' in capsys.readouterr().out


def test_the_first_dpo_step_matches_trl_on_the_same_batch(tmp_path: Path) -> None:
    """swiftk's DPO stage and TRL's DPOTrainer, same init, pairs and settings (bench/dpo_vs_trl.py): the first
    step's loss, rewards and log-probs agree."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dpo_vs_trl", REPO / "bench" / "dpo_vs_trl.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    _, ours = bench.run_swiftk(2, tmp_path, precompute=False)
    _, theirs = bench.run_trl(2, tmp_path)
    for key in bench.FIRST:
        assert float(ours[key]) == pytest.approx(float(theirs[key]), rel=1e-4, abs=1e-6), key


def test_kto_starts_at_one_half_and_splits_pairs_into_examples(tmp_path: Path) -> None:
    """At step 1 the policy is the reference: every log-ratio and the KL estimate are 0, so each example's loss is
    s(0) = 1/2, whichever side it is on."""
    args = ["run", "configs/tiny_kto.toml", "--set", "train.max_steps=4", "--set", "eval.every=2", "--set",
            "train.batch_size=8", "--set", f'output.dir="{tmp_path / "run"}"', "--set", 'log.progress="none"']
    assert main(args) == 0
    lines = read(tmp_path / "run" / "metrics.jsonl")
    first = steps(lines)[0]
    assert first.loss == pytest.approx(0.5, rel=1e-3) and first.metrics["kl"] == 0.0
    assert {"rewards/chosen", "rewards/rejected"} & set(first.metrics)
    assert of_kind(lines, EvalEvent)[-1].metrics["eval_loss"] > 0


def test_collate_unpaired_mismatches_prompts_half_a_batch_away(tmp_path: Path) -> None:
    from swiftk.kernel.config import ModelConfig
    from swiftk.kernel.model import load_tokenizer
    from swiftk.plugins.stages.pairs import build_unpaired, collate_unpaired, prompt_length

    tok = load_tokenizer(ModelConfig(model_id=str(REPO / "data" / "tiny_tokenizer")))
    path = str(REPO / "data" / "synthetic" / "addition_pref_eval.jsonl")
    from swiftk.kernel.config import DataConfig

    examples = build_unpaired(path, tok, DataConfig(train_file=path, max_length=32))[:4]
    assert [e.desirable for e in examples] == [True, False, True, False]
    batch = collate_unpaired(examples, tok.pad_token_id)
    assert batch.input_ids.shape[0] == 8 and batch.extras["desirable"].tolist() == [True, False, True, False]
    cut = prompt_length(examples[0].sample)
    row = batch.input_ids[4].tolist()
    assert row[:cut] == examples[0].sample.input_ids[:cut]  # example 0's prompt...
    other = examples[2].sample  # ...with the completion of example 2 (another prompt), not of example 1
    assert row[cut:cut + len(other.input_ids) - prompt_length(other)] == other.input_ids[prompt_length(other):]


def test_task_type_must_fit_the_stage(capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "configs/tiny_sft.toml", "--set", 'data.task_type="preference"']) == 2
    assert "[data] task_type: 'preference' does not fit [train] stage = 'sft', which reads 'sft' data" in \
        capsys.readouterr().err
    assert main(["run", "configs/tiny_dpo.toml", "--set", 'data.task_type="preference"', "--print-config"]) == 0
