"""`swiftk eval` reports for people: the terminal table, deltas against a baseline with their significance, a
task one report lacks shown as missing, the PNG chart, and the three path forms `--compare` accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from swiftk.kernel.evals.report import DPI, chart, compare, compare_paths, figsize, table
from swiftk.kernel.evals.results import EvalReport, TaskResult, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def report(*tasks: TaskResult, model: str = "runs/a") -> EvalReport:
    return EvalReport(model=model, adapter=None, config_hash=None, engine="hf", tasks=list(tasks),
                      created="2026-12-05T00:00:00Z", step=40, limit=100)


def result(task: str, value: float, stderr: float | None = 0.01, metric: str = "acc") -> TaskResult:
    return TaskResult(task=task, metric=metric, value=value, stderr=stderr, n=100, seconds=12.5)


BASE = report(result("gsm8k", 0.5, metric="exact_match"), result("arc_easy", 0.75), result("hellaswag", 0.25))
TUNED = report(result("gsm8k", 0.625, metric="exact_match"), result("arc_easy", 0.7578125))


def test_table_has_header_tasks_and_values() -> None:
    text = table(BASE)
    header, columns, rule, *rows = text.splitlines()
    assert header == "model runs/a | engine hf | step 40 | limit 100 items/task"
    assert columns.split() == ["task", "metric", "value", "±", "stderr", "n", "backend", "seconds"]
    assert rows[0].split() == ["gsm8k", "exact_match", "0.5000", "±0.0100", "100", "lm-eval", "12.5"]
    assert [r.split()[0] for r in rows] == ["gsm8k", "arc_easy", "hellaswag"]
    assert len({len(line) for line in (columns, rule, *rows)}) == 1  # fixed-width columns


def test_deltas_are_exact_and_starred_only_when_significant() -> None:
    """gsm8k: Δ = 0.625 - 0.5 = 0.125 > 1.96 × sqrt(0.01² + 0.01²) ≈ 0.0277, starred;
    arc_easy: Δ = 0.7578125 - 0.75 = 0.0078125 < 0.0277, not starred."""
    comparison = compare([("base", BASE), ("tuned", TUNED)])
    gsm8k, arc, _ = comparison.rows
    assert (gsm8k.cells[1].delta, gsm8k.cells[1].significant) == (0.125, True)
    assert (arc.cells[1].delta, arc.cells[1].significant) == (0.0078125, False)
    lines = comparison.table().splitlines()
    assert lines[2].split()[-1] == "+0.1250*" and lines[3].split()[-1] == "+0.0078"
    assert comparison.to_json()["tasks"][0]["reports"]["tuned"]["delta"] == 0.125


def test_missing_task_is_missing_not_zero() -> None:
    comparison = compare([("base", BASE), ("tuned", TUNED)])
    hellaswag = comparison.rows[2].cells[1]
    assert (hellaswag.value, hellaswag.delta, hellaswag.significant) == (None, None, None)
    row = comparison.table().splitlines()[4].split()
    assert row[0] == "hellaswag" and row[-2:] == ["missing", "n/a"]


def test_other_main_metric_is_not_compared_and_said() -> None:
    other = report(result("arc_easy", 0.9, metric="acc_norm"))
    cell = compare([("base", BASE), ("norm", other)]).rows[1].cells[1]
    assert cell.value is None and cell.delta is None and "acc_norm, not acc" in (cell.note or "")
    assert "arc_easy @ norm: main metric is acc_norm, not acc" in compare([("base", BASE), ("norm", other)]).table()


def test_chart_is_a_png_of_the_expected_size(tmp_path: Path) -> None:
    import matplotlib.image

    path = chart(compare([("base", BASE), ("tuned", TUNED)]), tmp_path / "c.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    width, height = figsize(3, 2)
    assert matplotlib.image.imread(path).shape == (round(height * DPI), round(width * DPI), 4)


def test_compare_paths_reads_all_three_forms_and_writes_outputs(tmp_path: Path) -> None:
    a = write_report(BASE, tmp_path / "x" / "base")  # results.json itself
    write_report(TUNED, tmp_path / "y" / "tuned")  # a folder holding one
    write_report(TUNED, tmp_path / "z" / "run" / "eval")  # a run folder with eval/results.json
    comparison, png = compare_paths([a, tmp_path / "y" / "tuned", tmp_path / "z" / "run"], tmp_path / "out")
    assert comparison.labels == ("base", "tuned", "run")
    assert png == tmp_path / "out" / "compare.png" and png.read_bytes()[:8] == PNG_SIGNATURE
    assert (tmp_path / "out" / "compare.json").is_file()


def test_compare_paths_disambiguates_same_folder_names(tmp_path: Path) -> None:
    write_report(BASE, tmp_path / "lora" / "eval")
    write_report(TUNED, tmp_path / "full" / "eval")
    comparison, png = compare_paths([tmp_path / "lora" / "eval", tmp_path / "full" / "eval"], None)
    assert comparison.labels == ("lora", "full") and png is None
    write_report(TUNED, tmp_path / "other" / "lora")
    labels = compare_paths([tmp_path / "lora", tmp_path / "other" / "lora"], None)[0].labels
    assert labels == (f"{tmp_path.name}/lora", "other/lora")


def test_fewer_than_two_paths_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2 reports"):
        compare_paths([write_report(BASE, tmp_path)], None)
