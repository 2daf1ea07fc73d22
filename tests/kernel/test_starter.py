"""kernel/starter.py: every combination the presets offer is a config `swiftk run` accepts, or a clear refusal."""

from __future__ import annotations

import itertools
import tomllib
from pathlib import Path

import pytest

from swiftk.kernel.config import load_config
from swiftk.kernel.errors import ConfigError
from swiftk.kernel.starter import MODELS, STAGES, TUNERS, Answers, check, config_text, write

OWN_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub id: passed through as model_id, never fetched here
COMBINATIONS = [c for c in itertools.product([*MODELS, OWN_MODEL], STAGES, TUNERS) if c[:3:2] != ("tiny", "qlora")]


@pytest.mark.parametrize(("model", "stage", "tuner"), COMBINATIONS)
def test_every_preset_combination_validates(model: str, stage: str, tuner: str, tmp_path: Path) -> None:
    answers = Answers(name=f"{model.replace('/', '_')}_{stage}_{tuner}", model=model, stage=stage, tuner=tuner,
                      runs_dir=str(tmp_path / "runs"))
    cfg = write(answers, tmp_path / "c.toml")
    assert (cfg.train.stage, cfg.train.tuner_strategy) == (stage, tuner)
    assert cfg.output.dir == str(tmp_path / "runs" / answers.name)
    assert load_config(tmp_path / "c.toml").model.model_id == cfg.model.model_id


def test_qlora_on_the_random_model_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="tuner 'qlora'.*choose full"):
        config_text(Answers(model="tiny", tuner="qlora"))


def test_choices_override_the_preset_and_every_value_is_commented() -> None:
    text = config_text(Answers(model="tiny", stage="dpo", tuner="full", lr=2e-4, max_steps=7, batch_size=3,
                               data="data/synthetic/reversal_pref_train.jsonl"))
    raw = tomllib.loads(text)
    assert raw["train"]["lr"] == 2e-4 and raw["train"]["max_steps"] == 7
    assert raw["train"]["batch_size"] == 3 and raw["data"]["train_file"].startswith("data/synthetic/reversal")
    assert "eval" not in raw  # the preset's held-out file belongs to its own data
    table_lines = [line for line in text.splitlines() if "=" in line and not line.startswith("#")]
    uncommented = [line.split("=")[0].strip() for line in table_lines if "#" not in line]
    assert set(uncommented) <= {"init", "architecture", "seed", "weight_decay"}, uncommented


def test_bad_answers_are_all_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        config_text(Answers(name="my run", model="smollm", stage="ppo", precision="fp16"))
    problems = "\n".join(caught.value.problems)
    assert "did you mean" not in problems and len(caught.value.problems) == 4
    assert "smollm2, tiny" in problems and "sft, dpo" in problems and "auto, bf16 or fp32" in problems


def test_check_reports_the_cli_messages_against_the_target_path_and_writes_nothing(tmp_path: Path) -> None:
    text = config_text(Answers(model="tiny")).replace("max_steps = ", "max_stesp = ")
    target = tmp_path / "mine.toml"
    with pytest.raises(ConfigError, match=r"max_stesp: unknown key; did you mean 'max_steps'\? \(.*mine\.toml:\d+\)"):
        check(text, target)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_write_refuses_an_existing_file_unless_asked(tmp_path: Path) -> None:
    target = tmp_path / "c.toml"
    target.write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        write(Answers(model="tiny"), target)
    assert target.read_text() == "mine"
    write(Answers(model="tiny"), target, overwrite=True)
    assert load_config(target).model.init == "random" and sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]
