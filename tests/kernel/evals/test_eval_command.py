"""`swiftk eval`'s command line: clear errors for unknown tasks (with close matches), an endpoint without its
backend, no target; --list-tasks; --compare of two reports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from swiftk.kernel.cli import main
from swiftk.kernel.evals.results import EvalReport, TaskResult, write_report


def test_an_unknown_task_lists_close_matches(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "data/tiny_tokenizer", "--tasks", "humaneva,hellaswg"]) == 2
    err = capsys.readouterr().err
    assert "no eval task named 'humaneva' (did you mean humaneval" in err
    assert "no eval task named 'hellaswg' (did you mean hellaswag" in err


def test_a_missing_jsonl_task_and_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "data/tiny_tokenizer", "--tasks", "nowhere.jsonl"]) == 2
    assert "nowhere.jsonl: no such file" in capsys.readouterr().err
    assert main(["eval", "data/tiny_tokenizer", "--tasks", "facts", "--limit", "0"]) == 2
    assert "--limit 0" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "RUN|MODEL|URL" in capsys.readouterr().err
    assert main(["eval", "http://127.0.0.1:9/v1", "--tasks", "facts"]) == 2
    assert "--backend evalscope" in capsys.readouterr().err


def test_list_tasks_names_ours_and_lm_evals() -> None:
    out = subprocess.run([sys.executable, "-m", "swiftk", "eval", "--list-tasks"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    for name in ("quickstart", "arithmetic", "countdown", "facts", "humaneval", "hellaswag", "gsm8k"):
        assert name in out


def test_compare_prints_deltas_and_writes_a_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in (("base", 0.25), ("tuned", 0.75)):
        write_report(EvalReport(name, None, None, "hf", [TaskResult("facts", "acc", value, 0.05, 100)],
                                "2026-12-05T00:00:00+00:00"), tmp_path / name)
    assert main(["eval", "--compare", str(tmp_path / "base"), str(tmp_path / "tuned"), "--out",
                 str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "facts" in out and "+0.5000*" in out
    assert (tmp_path / "cmp" / "compare.png").is_file() and (tmp_path / "cmp" / "compare.json").is_file()
    assert main(["eval", "--compare", str(tmp_path / "base")]) == 2


def test_task_options_follow_the_name_and_a_wrong_one_lists_the_tasks_own() -> None:
    from swiftk.kernel.evals.runner import TaskError, resolve

    arithmetic, humaneval = resolve(["arithmetic:n=5:digits=3:chat=false", "humaneval:timeout_s=2.5"])
    items = arithmetic.task.items()
    assert len(items) == 5 and items[0]["prompt"].endswith("=") and not arithmetic.task.chat
    assert humaneval.task.reward_config["timeout_s"] == 2.5
    with pytest.raises(TaskError, match=r"unexpected keyword argument 'size'.*n: 'int' = 100"):
        resolve(["arithmetic:size=4"])
