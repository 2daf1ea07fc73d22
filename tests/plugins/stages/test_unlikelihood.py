"""A new stage from one plugin file, with no edit elsewhere: configs/plugins/unlikelihood.py (an SFT variant that
also unlearns a near-miss answer) trains from configs/unlikelihood.toml, its own key is checked, and the
held-out log-likelihood of the right sums rises (40 steps: about -6.5 -> -6.0)."""

from __future__ import annotations

from pathlib import Path

import pytest

from swiftk.contracts.events import EvalEvent, of_kind, read
from swiftk.kernel.cli import main


def test_a_plugin_file_stage_trains_and_learns_on_held_out_pairs(tmp_path: Path) -> None:
    args = ["run", "configs/unlikelihood.toml", "--set", "train.max_steps=40", "--set", "eval.every=20",
            "--set", f'output.dir="{tmp_path / "run"}"', "--set", 'log.progress="none"',
            "--set", "output.save_final=false"]
    assert main(args) == 0
    evals = of_kind(read(tmp_path / "run" / "metrics.jsonl"), EvalEvent)
    chosen = [e.metrics["eval_logps/chosen"] for e in evals]
    assert [e.step for e in evals] == [20, 40] and chosen[-1] > chosen[0] + 0.2, chosen
    assert 0 <= evals[-1].metrics["eval_accuracy"] <= 1


def test_the_stage_key_is_its_own(capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "configs/unlikelihood.toml", "--set", "train.unlikelihood_alpha=-1", "--print-config"]) == 2
    assert "[train] unlikelihood_alpha: Input should be greater than or equal to 0" in capsys.readouterr().err
    assert main(["run", "configs/tiny_sft.toml", "--set", "train.unlikelihood_alpha=1"]) == 2
    assert "unlikelihood_alpha: unknown key" in capsys.readouterr().err
