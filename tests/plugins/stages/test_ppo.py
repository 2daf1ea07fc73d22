"""The ppo stage end to end: a reward model trained by the rm stage (configs/tiny_rm.toml on pairs of a clean sum
against the sum with a stray digit) scores the answers of the habit model (which ends most answers with a stray
digit), and PPO (configs/tiny_ppo.toml) raises the reward model's mean score of the held-out greedy answers while
training the policy and its value head; also with LoRA, and a config without a reward model is refused."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swiftk.contracts.events import EvalEvent, of_kind, read
from swiftk.kernel.checkpoint import latest_checkpoint
from swiftk.kernel.cli import main
from swiftk.kernel.config import load_config

from ...conftest import REPO, write_config


def stray_pairs(source: Path, target: Path, seed: int = 0) -> Path:
    """Preference pairs from addition rows: the clean sum chosen, the sum with a stray digit rejected."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    target.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["completion"],
                                          "rejected": f"{r['completion']} {rng.randrange(10)}"}) + "\n" for r in rows))
    return target


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory: pytest.TempPathFactory, tiny_addition_model: Path) -> Path:
    """configs/tiny_rm.toml for 60 steps from the tiny addition model's backbone (InstructGPT's recipe), on clean
    against stray-digit answers: it tells them apart on held-out sums."""
    root = tmp_path_factory.mktemp("tiny_rm")
    data = REPO / "data" / "synthetic"
    train = stray_pairs(data / "addition_train.jsonl", root / "train.jsonl")
    held_out = stray_pairs(data / "addition_eval.jsonl", root / "eval.jsonl", seed=1)
    cfg = write_config(root / "tiny_rm.toml", (REPO / "configs" / "tiny_rm.toml").read_text(),
                       model_id=f'"{tiny_addition_model}"', init='"pretrained"', max_steps="60", every="60",
                       save_every="1000", dir=f'"{root / "run"}"', train_file=f'"{train}"', eval_file=f'"{held_out}"')
    assert main(["run", str(cfg), "--set", 'log.progress="none"']) == 0
    accuracy = of_kind(read(root / "run" / "metrics.jsonl"), EvalEvent)[-1].metrics["eval_rewards/accuracies"]
    print(f"tiny reward model: held-out pairwise accuracy {accuracy:.2f}")
    assert accuracy > 0.9
    return root / "run" / "final"


def ppo(tmp_path: Path, policy: Path, reward_model: Path, *sets: str) -> tuple[list[EvalEvent], Path, float]:
    """configs/tiny_ppo.toml on ``policy``: its eval records, its last checkpoint, and its run time."""
    cfg = write_config(tmp_path / "tiny_ppo.toml", (REPO / "configs" / "tiny_ppo.toml").read_text(),
                       model_id=f'"{policy}"', reward_model=f'"{reward_model}"', dir=f'"{tmp_path / "run"}"')
    started = time.perf_counter()
    args = ["run", str(cfg), "--set", 'log.progress="none"', "--set", "output.save_every=1000"]
    assert main([*args, *(a for s in sets for a in ("--set", s))]) == 0
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None
    return of_kind(read(tmp_path / "run" / "metrics.jsonl"), EvalEvent), checkpoint, time.perf_counter() - started


@pytest.mark.slow
def test_ppo_raises_the_reward_models_score(tmp_path: Path, habit_model: Path, tiny_reward_model: Path) -> None:
    evals, checkpoint, seconds = ppo(tmp_path, habit_model, tiny_reward_model)
    before, after = evals[0].metrics["eval_score"], evals[-1].metrics["eval_score"]
    print(f"ppo, full fine-tuning: held-out eval_score {before:.3f} (step 0) -> {after:.3f} (step {evals[-1].step}) "
          f"in {seconds:.0f} s")
    assert evals[0].step == 0 and after > before + 0.5 * abs(before)
    lengths = [e.metrics["eval_completions/mean_length"] for e in evals]
    assert lengths[-1] < lengths[0]  # the stray digit is dropped
    trained, start = load_file(checkpoint / "model.safetensors"), load_file(habit_model / "model.safetensors")
    assert trained["v_head.weight"].abs().sum() > 0  # it started at 0
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.slow
def test_ppo_with_lora_trains_the_adapter_and_the_value_head(tmp_path: Path, tiny_addition_model: Path,
                                                             tiny_reward_model: Path) -> None:
    evals, checkpoint, seconds = ppo(tmp_path, tiny_addition_model, tiny_reward_model, 'train.tuner_strategy="lora"',
                                     "train.lora_rank=8", "train.lr=1e-3", "train.max_steps=4", "eval.every=4")
    weights = load_file(checkpoint / "model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    print(f"ppo, LoRA: {len(lora_b)} LoRA B matrices, eval_score {evals[0].metrics['eval_score']:.3f} -> "
          f"{evals[-1].metrics['eval_score']:.3f} in {seconds:.0f} s")
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # LoRA B starts at 0
    assert weights["v_head.weight"].abs().sum() > 0


def test_a_missing_or_wrong_reward_model_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = (REPO / "configs" / "tiny_ppo.toml").read_text()
    missing = tmp_path / "missing.toml"
    missing.write_text("\n".join(line for line in text.splitlines() if not line.startswith("reward_model")))
    assert main(["run", str(missing)]) == 2
    assert "[train] reward_model: required key is missing" in capsys.readouterr().err
    wrong = write_config(tmp_path / "wrong.toml", text, reward_model='"data/tiny_tokenizer"',
                         model_id='"data/tiny_tokenizer"')
    assert main(["run", str(wrong)]) == 2
    assert "[train] reward_model: data/tiny_tokenizer is not a model folder" in capsys.readouterr().err


def test_the_shipped_ppo_configs_validate() -> None:
    for name in ("tiny_ppo", "ppo"):
        train = load_config(REPO / "configs" / f"{name}.toml").train
        assert train.stage == "ppo" and train.ppo_epochs == 4 and train.rewards == []
