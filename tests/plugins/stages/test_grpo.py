"""The grpo stage: it learns (held-out accuracy), survives rewards that hang, crash or return garbage, pauses when
they keep failing, hot-reloads an edited reward, and learns from one generation over several steps."""

from __future__ import annotations

import math
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from swiftk.contracts.events import (
    EvalEvent,
    PluginReloadedEvent,
    RewardFailedEvent,
    RunPausedEvent,
    StepEvent,
    of_kind,
    read,
    steps,
)
from swiftk.kernel.cli import main
from swiftk.plugins.stages.grpo import GRPO, GRPOConfig

from ...conftest import REPO, write_config


def grpo_config(tmp_path: Path, model: Path, head: str = "", **replace: str) -> Path:
    """configs/tiny_grpo.toml from ``model``, writing into tmp_path/run; ``head`` goes before its tables, a key the
    file does not set goes into [train]."""
    text = (REPO / "configs" / "tiny_grpo.toml").read_text()
    values = {"model_id": f'"{model}"', "dir": f'"{tmp_path / "run"}"', **replace}
    for key in [k for k in values if not re.search(rf"(?m)^{k}\s*=", text)]:
        text = text.replace("[train]\n", f"[train]\n{key} = {values.pop(key)}\n", 1)
    return write_config(tmp_path / "grpo.toml", head + text, **values)


SMALL = {"max_steps": "4", "batch_size": "4", "num_generations": "4", "every": "1000", "on_start": "false",
         "save_every": "1000"}


@pytest.mark.slow
def test_grpo_unlearns_a_habit_and_held_out_accuracy_rises(tmp_path: Path, habit_model: Path) -> None:
    cfg = grpo_config(tmp_path, habit_model, max_steps="20")
    assert main(["run", str(cfg)]) == 0
    records = read(tmp_path / "run" / "metrics.jsonl")
    accuracy = [(e.step, e.metrics["eval_rewards/accuracy"]) for e in of_kind(records, EvalEvent)]
    print(f"held-out accuracy (greedy, step: value): {accuracy}")
    assert [s for s, _ in accuracy] == [0, 10, 20]
    assert accuracy[-1][1] >= accuracy[0][1] + 0.15  # 0.06 -> ~0.4 here
    first, last = steps(records)[0].metrics, steps(records)[-1].metrics
    assert last["completions/mean_length"] < first["completions/mean_length"]  # the stray digit is gone
    assert {"reward", "reward_std", "rewards/accuracy/mean", "frac_reward_zero_std", "clip_ratio/region_mean",
            "timing/rollout_s", "reward/failure_rate"} <= set(first)


GARBAGE = '''
from swiftk.contracts import hookimpl

@hookimpl
def swiftk_reward_compute(completions, state):
    if state.step % 2:
        return {"garbage": ["yes"] * len(completions)}  # not numbers: invalid
    return {"garbage": [0.0] * len(completions)}
'''

CRASHES = '''
from swiftk.contracts import hookimpl

@hookimpl
def swiftk_reward_compute(completions, state):
    if state.step == 2:
        raise RuntimeError("the grader lost its database")
    return {"crashes": [0.0] * len(completions)}
'''

HANGS = '''
import pathlib
import time
from swiftk.contracts import hookimpl

MARK = pathlib.Path(__file__).with_suffix(".hung")

@hookimpl
def swiftk_reward_compute(completions):
    if not MARK.exists():  # the first call hangs; the supervisor kills the host at its deadline
        MARK.touch()
        time.sleep(120)
    return {"hangs": [0.0] * len(completions)}
'''


def plugin_files(tmp_path: Path, **sources: str) -> dict[str, Path]:
    paths = {}
    for name, source in sources.items():
        paths[name] = tmp_path / f"{name}.py"
        paths[name].write_text(source)
    return paths


@pytest.mark.slow
def test_rewards_that_hang_crash_or_return_garbage_cost_their_values_not_the_run(tmp_path: Path,
                                                                              tiny_addition_model: Path) -> None:
    files = plugin_files(tmp_path, garbage=GARBAGE, crashes=CRASHES, hangs=HANGS)
    head = (f'[[plugins]]\npath = "{files["garbage"]}"\n\n[[plugins]]\npath = "{files["crashes"]}"\n\n'
            f'[[plugins]]\npath = "{files["hangs"]}"\nisolation = "process"\ndeadline_s = 3\non_failure = "skip"\n\n')
    cfg = grpo_config(tmp_path, tiny_addition_model, head, **SMALL, reward_failure_threshold="0.9")
    started = time.perf_counter()
    assert main(["run", str(cfg)]) == 0
    records = read(tmp_path / "run" / "metrics.jsonl")
    failures = {(e.plugin.split(":")[-1], e.outcome, e.step) for e in of_kind(records, RewardFailedEvent)}
    assert ("hangs", "timeout", 0) in failures
    assert ("garbage", "invalid", 1) in failures and ("garbage", "invalid", 3) in failures
    assert ("crashes", "crashed", 2) in failures
    records_by_step = {e.step: e for e in steps(records)}
    assert len(records_by_step) == 4 and all(math.isfinite(e.loss) for e in records_by_step.values())
    assert records_by_step[1].metrics["reward/failure_rate"] > 0
    assert 0 <= records_by_step[4].metrics["rewards/accuracy/mean"] <= 1  # the good reward kept scoring throughout
    assert time.perf_counter() - started < 120


@pytest.mark.slow
def test_rewards_failing_past_the_threshold_pause_the_run_and_resume_continues(tmp_path: Path,
                                                                               tiny_addition_model: Path) -> None:
    broken = tmp_path / "judge.py"
    broken.write_text(CRASHES.replace("state.step == 2", "True"))
    cfg = grpo_config(tmp_path, tiny_addition_model, f'plugins = ["{broken}"]\n\n', **SMALL,
                      reward_failure_threshold="0.4", reward_failure_window="2")
    assert main(["run", str(cfg)]) == 3  # paused: accuracy ok, the judge crashed -> half the values failed
    records = read(tmp_path / "run" / "metrics.jsonl")
    (paused,) = of_kind(records, RunPausedEvent)
    assert paused.step == 1  # the second rollout completes the window of two
    assert "module:judge (judge): crashed, 16/16 failed (RuntimeError" in paused.reason
    assert "reward_failure_threshold = 0.4" in paused.reason
    assert (tmp_path / "run" / "checkpoints" / "step-000001").is_dir()
    broken.write_text(CRASHES)  # fixed (it crashes at step 2 only, one bad rollout in the window)
    assert main(["run", str(cfg), "--resume"]) == 0
    assert steps(read(tmp_path / "run" / "metrics.jsonl"))[-1].step == 4


REWARD = '''
from swiftk.contracts import hookimpl, register_reward

@register_reward("constant")
class Constant:
    @hookimpl
    def swiftk_reward_compute(self, completions):
        return {"constant": [VALUE] * len(completions)}
'''


@pytest.mark.slow
def test_a_reward_edited_while_grpo_trains_is_swapped_at_a_step_boundary(tmp_path: Path,
                                                                         tiny_addition_model: Path) -> None:
    source = tmp_path / "constant.py"
    source.write_text(REWARD.replace("VALUE", "0.25"))
    head = f'[[plugins]]\npath = "{source}"\nwatch = true\n\n'
    cfg = grpo_config(tmp_path, tiny_addition_model, head, **{**SMALL, "max_steps": "12"},
                      rewards='["accuracy", "constant"]')

    def edit_at_step_3() -> None:
        metrics = tmp_path / "run" / "metrics.jsonl"
        while not (metrics.exists() and '"step": 3,' in metrics.read_text()):
            time.sleep(0.05)
        source.write_text(REWARD.replace("VALUE", "0.75"))

    editor = threading.Thread(target=edit_at_step_3, daemon=True)
    editor.start()
    assert main(["run", str(cfg)]) == 0
    editor.join(timeout=5)
    records = read(tmp_path / "run" / "metrics.jsonl")
    (reload,) = of_kind(records, PluginReloadedEvent)
    assert reload.plugin == "reward:constant"
    values = {e.step: e.metrics["rewards/constant/mean"] for e in steps(records)}
    assert all(values[s] == 0.25 for s in values if s <= reload.step)  # step s's rollout happened before the swap
    assert all(values[s] == 0.75 for s in values if s > reload.step)
    assert values[12] == 0.75


@pytest.mark.slow
def test_one_generation_feeds_several_steps_with_a_reference_and_token_level_loss(tmp_path: Path,
                                                                                  tiny_addition_model: Path) -> None:
    cfg = grpo_config(tmp_path, tiny_addition_model, **SMALL, steps_per_generation="2", beta="0.04",
                      loss_type='"dapo"', lr="5e-4")
    assert main(["run", str(cfg)]) == 0
    records: list[StepEvent] = steps(read(tmp_path / "run" / "metrics.jsonl"))
    generated = [e.step for e in records if "timing/rollout_s" in e.metrics]
    assert generated == [1, 3]  # steps 2 and 4 learn from the rollouts of steps 1 and 3
    assert all("kl" in e.metrics for e in records)
    assert records[0].metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference at step 1
    assert records[1].metrics["kl"] > 0 and records[1].metrics["clip_ratio/region_mean"] >= 0


def stage(**train: Any) -> GRPO:
    config = GRPOConfig(**{"num_generations": 4, **train})
    return GRPO(SimpleNamespace(**config.model_dump(), loss_config={}, grad_accum=1))


def test_advantages_are_relative_to_the_group_and_nan_rewards_get_none() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 1.0, math.nan, 0.0, math.nan], dtype=torch.float64)
    group = stage().advantages(rewards)
    assert group[:4].tolist() == pytest.approx([0.75 / (0.5 + 1e-4)] + [-0.25 / (0.5 + 1e-4)] * 3)
    assert group[4:8].tolist() == [0.0] * 4  # one reward for the whole group: nothing to learn
    assert group[8].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-4)) and group[9].item() == 0.0
    assert float(group[:4].sum()) == pytest.approx(0.0, abs=1e-9)
    unscaled = stage(scale_rewards="none").advantages(rewards)
    assert unscaled[:4].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    batch = stage(scale_rewards="batch").advantages(rewards)
    finite = rewards[~rewards.isnan()]
    assert batch[0].item() == pytest.approx(0.75 / (float(finite.std()) + 1e-4))


def test_config_problems_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = REPO / "data" / "tiny_tokenizer"
    cfg = grpo_config(tmp_path, model, **SMALL, reward_config="{ code = { timeout_s = 2 } }")
    assert main(["run", str(cfg)]) == 2
    assert "[train] reward_config.code: 'code' is not in [train] rewards ['accuracy']" in capsys.readouterr().err
    cfg = grpo_config(tmp_path, model, **SMALL, rewards='["acuracy"]')
    assert main(["run", str(cfg)]) == 2
    assert "acuracy" in capsys.readouterr().err
    cfg = grpo_config(tmp_path, model, **SMALL, generate_ahead="true")
    assert main(["run", str(cfg)]) == 2
    assert "[train] generate_ahead: the 'hf' engine samples from the very weights" in capsys.readouterr().err


@pytest.mark.engines
def test_grpo_on_vllm_generates_one_step_ahead_and_corrects_for_the_stale_weights(tmp_path: Path,
                                                                                   tiny_addition_model: Path) -> None:
    """vLLM in its own process samples step s+1's rollouts while step s learns (the weights it serves are one step
    old); every sample records the version it was drawn with, and the importance weight pi_trainer / pi_engine
    (capped at 3) corrects the loss."""
    head = ""
    cfg = grpo_config(tmp_path, tiny_addition_model, head, **SMALL, generate_ahead="true", engine='"vllm"',
                      lr="5e-4")
    cfg.write_text(cfg.read_text().replace("[generation]\n", "[generation]\nkv_cache_gb = 1\n"))
    assert main(["run", str(cfg)]) == 0
    records = steps(read(tmp_path / "run" / "metrics.jsonl"))
    assert [e.step for e in records] == [1, 2, 3, 4]
    assert [e.metrics["rollout/staleness"] for e in records] == [0.0, 1.0, 1.0, 1.0]
    weights = [e.metrics["rollout/is_weight_mean"] for e in records]
    print(f"importance weights (mean per step): {weights}")
    assert all(0.0 < w <= 3.0 for w in weights) and abs(weights[0] - 1.0) < 0.05  # step 1: the same weights
    assert all(math.isfinite(e.loss) for e in records)


def test_the_shipped_grpo_configs_validate() -> None:
    from swiftk.kernel.config import load_config

    for name in ("tiny_grpo", "grpo"):
        train = load_config(REPO / "configs" / f"{name}.toml").train
        assert train.stage == "grpo" and "accuracy" in train.rewards
    assert load_config(REPO / "configs" / "tiny_habit.toml").data.train_file.endswith("addition_stray_train.jsonl")
