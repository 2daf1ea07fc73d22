"""What ``swiftk eval`` shows people: one report as a terminal table, several reports compared against the first
(deltas, starred where larger than 1.96 combined standard errors), and that comparison as a grouped bar chart.

Reports come in through :mod:`~swiftk.kernel.evals.results` (:func:`read_report`), never as raw JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from swiftk.kernel.evals.results import EvalReport, TaskResult, locate, read_report

Z95 = 1.96  # two-sided ~95 % for the difference of two means, each with its standard error
DPI = 100  # with figsize in inches: the PNG's pixel size
MISSING = "missing"


def table(report: EvalReport) -> str:
    """One report for the terminal: a line naming what was evaluated and how, then one row per task."""
    facts = [f"model {report.model}" + (f" + adapter {report.adapter}" if report.adapter else ""),
             f"engine {report.engine}"]
    if report.step is not None:
        facts.append(f"step {report.step}")
    if report.limit is not None:
        facts.append(f"limit {report.limit} items/task")
    head = ["task", "metric", "value", "± stderr", "n", "backend", "seconds"]
    rows = [[t.task, t.metric, f"{t.value:.4f}", "n/a" if t.stderr is None else f"±{t.stderr:.4f}", str(t.n),
             t.backend, f"{t.seconds:.1f}"] for t in report.tasks]
    return " | ".join(facts) + "\n" + _grid(head, rows, right={2, 3, 4, 6})


@dataclass(frozen=True)
class Cell:
    """One report's figure for one task, and how it differs from the baseline's."""

    value: float | None  # None: the report lacks the task, or measured it with another main metric (see note)
    stderr: float | None
    delta: float | None = None  # value - baseline value; None for the baseline itself or when either is None
    significant: bool | None = None  # |delta| > Z95 * sqrt(se_a² + se_b²); None when a stderr is missing
    note: str | None = None  # why value is None


@dataclass(frozen=True)
class TaskRow:
    task: str
    metric: str  # the main metric compared: that of the first report that has the task
    cells: tuple[Cell, ...]  # one per report, in Comparison.labels order


@dataclass(frozen=True)
class Comparison:
    """Several reports side by side, task by task; the first report (``labels[0]``) is the baseline."""

    labels: tuple[str, ...]
    rows: tuple[TaskRow, ...]

    def cells_text(self) -> tuple[list[str], list[list[str]]]:
        """The head and rows of the table as text (what the terminal and the web page show)."""
        head = ["task", "metric", *self.labels, *(f"Δ {label}" for label in self.labels[1:])]
        rows = [[r.task, r.metric, *map(_value_text, r.cells), *map(_delta_text, r.cells[1:])] for r in self.rows]
        return head, rows

    def table(self) -> str:
        head, rows = self.cells_text()
        notes = [f"  {r.task} @ {label}: {c.note}" for r in self.rows
                 for label, c in zip(self.labels, r.cells, strict=True) if c.note and c.note != MISSING]
        foot = f"Δ against {self.labels[0]}; * where |Δ| > {Z95} × sqrt(se_a² + se_b²) (~95 %; none without both)"
        return "\n".join([_grid(head, rows, right=set(range(2, len(head)))), "", foot, *notes])

    def to_json(self) -> dict[str, Any]:
        return {"baseline": self.labels[0], "labels": list(self.labels),
                "significant_if": f"|delta| > {Z95} * sqrt(stderr_a^2 + stderr_b^2)",
                "tasks": [{"task": r.task, "metric": r.metric,
                           "reports": {label: asdict(c) for label, c in zip(self.labels, r.cells, strict=True)}}
                          for r in self.rows]}


def compare(reports: list[tuple[str, EvalReport]]) -> Comparison:
    """Every task of any report, each report's main-metric value and its delta against the first report's."""
    labels = [label for label, _ in reports]
    if not reports or len(set(labels)) != len(labels):
        raise ValueError(f"compare needs at least one report and distinct labels; got {labels}")
    tasks = list(dict.fromkeys(t.task for _, r in reports for t in r.tasks))
    return Comparison(tuple(labels), tuple(_row(task, [r for _, r in reports]) for task in tasks))


def _row(task: str, reports: list[EvalReport]) -> TaskRow:
    results = [r.task(task) for r in reports]
    metric = next(t.metric for t in results if t is not None)
    cells = [_cell(t, metric) for t in results]
    return TaskRow(task, metric, (cells[0], *(_against(cells[0], c) for c in cells[1:])))


def _cell(result: TaskResult | None, metric: str) -> Cell:
    if result is None:
        return Cell(None, None, note=MISSING)
    if result.metric != metric:
        return Cell(None, None, note=f"main metric is {result.metric}, not {metric}; not compared")
    return Cell(result.value, result.stderr)


def _against(base: Cell, cell: Cell) -> Cell:
    if base.value is None or cell.value is None:
        return cell
    delta = cell.value - base.value
    if base.stderr is None or cell.stderr is None:
        return replace(cell, delta=delta)
    return replace(cell, delta=delta, significant=abs(delta) > Z95 * math.hypot(base.stderr, cell.stderr))


def _value_text(cell: Cell) -> str:
    if cell.value is None:
        return MISSING if cell.note == MISSING else "other metric"
    return f"{cell.value:.4f}" + ("" if cell.stderr is None else f" ±{cell.stderr:.4f}")


def _delta_text(cell: Cell) -> str:
    return "n/a" if cell.delta is None else f"{cell.delta:+.4f}" + ("*" if cell.significant else "")


def _grid(head: list[str], rows: list[list[str]], right: set[int]) -> str:
    """Fixed-width columns as wide as their widest cell; ``right`` holds the right-aligned (numeric) columns."""
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    return "\n".join([line(head).rstrip(), "  ".join("-" * w for w in widths), *(line(r).rstrip() for r in rows)])


def figsize(tasks: int, reports: int) -> tuple[float, float]:
    """The chart's size in inches: wider with more bars, capped at 16 (about 10 tasks × 5 reports)."""
    return min(16.0, max(6.0, 2.0 + tasks * (0.35 * reports + 0.4))), 4.5


def chart(comparison: Comparison, path: Path) -> Path:
    """A grouped bar chart: one group per task, one bar per report with its stderr as error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, tasks = len(comparison.labels), [r.task for r in comparison.rows]
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=figsize(len(tasks), k))
    for i, label in enumerate(comparison.labels):
        xs = [x + (i - (k - 1) / 2) * width for x in range(len(tasks))]
        cells = [r.cells[i] for r in comparison.rows]
        shown = [(x, c.value, c.stderr or 0.0) for x, c in zip(xs, cells, strict=True) if c.value is not None]
        bars = ax.bar([s[0] for s in shown], [s[1] for s in shown], width, color=f"C{i}", label=label,
                      yerr=[s[2] for s in shown], capsize=2, error_kw={"lw": 0.8})
        if len(tasks) * k <= 24:
            ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
        for x, c in zip(xs, cells, strict=True):
            if c.value is None:
                ax.text(x, 0, _value_text(c), rotation=90, ha="center", va="bottom", fontsize=7, color="grey")
    _decorate(ax, comparison, tasks)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _decorate(ax: Any, comparison: Comparison, tasks: list[str]) -> None:
    metrics = {r.metric for r in comparison.rows}
    tilt = len(tasks) > 4
    names = tasks if len(metrics) == 1 else [f"{r.task}\n{r.metric}" for r in comparison.rows]
    ax.set_xticks(range(len(tasks)), names, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylabel(metrics.pop() if len(metrics) == 1 else "main metric")
    ax.set_title(f"eval: {len(comparison.labels)} reports, baseline {comparison.labels[0]} (error bars: ±1 stderr)")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.15 * (high - low))  # headroom: the legend sits above the tallest bars
    ax.legend(fontsize=8, ncols=min(len(comparison.labels), 5))
    ax.grid(axis="y", alpha=0.3)


def compare_paths(paths: list[Path], out: Path | None = None) -> tuple[Comparison, Path | None]:
    """``swiftk eval --compare``: each path a results.json, a folder holding one, or a run folder (its eval/);
    the first is the baseline. With ``out``, writes ``out/compare.json`` and ``out/compare.png`` (returned)."""
    if len(paths) < 2:
        raise ValueError(f"comparing needs at least 2 reports (results.json, a folder holding one, or a run "
                         f"folder); got {len(paths)}: {[str(p) for p in paths]}")
    files = [locate(Path(p)) for p in paths]
    comparison = compare(list(zip(_labels(files), map(read_report, files), strict=True)))
    if out is None:
        return comparison, None
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(comparison.to_json(), indent=2) + "\n")
    return comparison, chart(comparison, out / "compare.png")


def _labels(files: list[Path]) -> list[str]:
    """Each report's folder name (a run's, not its eval/); a clashing name gets its parent's name prepended."""
    folders = [f.resolve().parent for f in files]
    folders = [f.parent if f.name == "eval" else f for f in folders]
    names = [f.name for f in folders]
    labels = [f"{f.parent.name}/{f.name}" if names.count(f.name) > 1 else f.name for f in folders]
    # the same report given twice: number the repeats so every label stays distinct
    return [label if labels[:i].count(label) == 0 else f"{label} #{labels[:i].count(label) + 1}"
            for i, label in enumerate(labels)]
