"""The gkd stage distils the tiny addition model (the teacher) into a smaller random-init student: the held-out
KL(teacher || student) per answer token falls well below its step-0 value; lmbda decides, step by step, whether
the student learns on its own samples; a teacher that is missing or has another vocabulary is a config error."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from swiftk.contracts.events import EvalEvent, of_kind, read, steps
from swiftk.kernel.cli import main

from ...conftest import REPO, write_config


def gkd_config(tmp_path: Path, teacher: Path | str, **replace: str) -> Path:
    text = (REPO / "configs" / "tiny_gkd.toml").read_text()
    return write_config(tmp_path / "gkd.toml", text, teacher_model_id=f'"{teacher}"', dir=f'"{tmp_path / "run"}"',
                        save_every="1000", **replace)


@pytest.mark.slow
def test_the_student_learns_the_teachers_distributions(tmp_path: Path, tiny_addition_model: Path) -> None:
    cfg = gkd_config(tmp_path, tiny_addition_model, max_steps="30")
    assert main(["run", str(cfg), "--set", "eval.every=15", "--set", 'log.progress="none"',
                 "--set", "output.save_final=false"]) == 0
    records = read(tmp_path / "run" / "metrics.jsonl")
    kl = [e.metrics["eval_kl"] for e in of_kind(records, EvalEvent)]
    print(f"held-out KL(teacher || student) per token at steps 0, 15, 30: {[round(k, 3) for k in kl]}")
    assert len(kl) == 3 and kl[-1] < 0.5 * kl[0], kl
    on_policy = [s.metrics["gkd/on_policy"] for s in steps(records)]
    assert 0 < sum(on_policy) < len(on_policy)  # lmbda = 0.5: both kinds of step
    assert all(("completions/mean_length" in s.metrics) == bool(s.metrics["gkd/on_policy"]) for s in steps(records))


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_lmbda_decides_each_step(tmp_path: Path, tiny_addition_model: Path, lmbda: float) -> None:
    cfg = gkd_config(tmp_path, tiny_addition_model, lmbda=str(lmbda), max_steps="4", on_start="false")
    assert main(["run", str(cfg), "--set", 'log.progress="none"', "--set", "output.save_final=false"]) == 0
    assert [s.metrics["gkd/on_policy"] for s in steps(read(tmp_path / "run" / "metrics.jsonl"))] == [lmbda] * 4


def test_a_teacher_that_does_not_fit_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(gkd_config(tmp_path, tmp_path / "no-teacher"))]) == 2
    assert f"[train] teacher_model_id: folder {tmp_path / 'no-teacher'} does not exist" in capsys.readouterr().err
    other = tmp_path / "other-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(other)
    assert main(["run", str(gkd_config(tmp_path, other)), "--overwrite"]) == 2
    assert "the teacher must use the student's tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
