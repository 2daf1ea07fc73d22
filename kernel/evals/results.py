"""What an evaluation produced, in one schema whichever backend ran: ``results.json`` and per-item samples.

``swiftk eval`` writes ``OUT/results.json`` (an :class:`EvalReport`) and ``OUT/samples/<task>.jsonl`` (one
:class:`ItemRecord` per item); a run evaluated during training writes the same under ``RUN/eval/``. The terminal
table, ``swiftk eval --compare`` and the web UI read reports through :func:`read_report`, never raw JSON.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = 1
RESULTS = "results.json"


@dataclass(frozen=True)
class TaskResult:
    """One task's figures: its main ``metric`` (``value`` ± ``stderr`` over ``n`` items) and every metric the
    backend reported for it."""

    task: str
    metric: str  # the task's main metric: exact_match, acc, pass@1...
    value: float
    stderr: float | None  # the standard error of the mean over items; None when the backend gives none
    n: int  # items scored
    metrics: dict[str, float] = field(default_factory=dict)  # every metric, the main one included
    backend: str = "lm-eval"  # lm-eval | evalscope
    seconds: float = 0.0  # wall-clock time of this task, generation and scoring


@dataclass(frozen=True)
class EvalReport:
    """One evaluation of one model on some tasks."""

    model: str  # what was evaluated: a run directory, a model folder / hub id, or an endpoint URL
    adapter: str | None  # a LoRA run's adapter folder, evaluated on its base
    config_hash: str | None  # sha256 of the run's config.toml (None for a model or an endpoint)
    engine: str  # hf | vllm | endpoint
    tasks: list[TaskResult]
    created: str  # ISO 8601, UTC
    step: int | None = None  # the optimizer step, when evaluated during training
    limit: int | None = None  # --limit: items per task, when capped
    schema: int = SCHEMA

    def task(self, name: str) -> TaskResult | None:
        return next((t for t in self.tasks if t.task == name), None)


@dataclass(frozen=True)
class ItemRecord:
    """One scored item: what the model was asked and answered, the reference, and its score."""

    index: int
    prompt: str
    output: str  # the generated text, or the chosen option for a multiple-choice item
    target: str
    score: float
    extra: dict[str, Any] = field(default_factory=dict)  # per-item details (each option's log-likelihood...)


def standard_error(scores: list[float]) -> float | None:
    """The standard error of the mean of per-item scores: their sample standard deviation over sqrt(n) (for 0/1
    scores, sqrt(p (1 - p) / (n - 1))); None for fewer than two items."""
    n = len(scores)
    if n < 2:
        return None
    mean = sum(scores) / n
    return math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n)


def write_report(report: EvalReport, out_dir: Path, samples: dict[str, list[ItemRecord]] | None = None) -> Path:
    """Write ``out_dir/results.json`` atomically (and ``out_dir/samples/<task>.jsonl``); returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, records in (samples or {}).items():
        folder = out_dir / "samples"
        folder.mkdir(exist_ok=True)
        _atomic_write(folder / f"{task}.jsonl", "".join(json.dumps(asdict(r)) + "\n" for r in records))
    path = out_dir / RESULTS
    _atomic_write(path, json.dumps(asdict(report), indent=2) + "\n")
    return path


def read_report(path: Path) -> EvalReport:
    """A report from ``results.json``, or from a folder holding one (a run's ``eval/`` or the run itself)."""
    path = locate(path)
    raw = json.loads(path.read_text())
    if raw.get("schema") != SCHEMA:
        raise ValueError(f"{path}: results schema {raw.get('schema')!r}; this swiftk reads schema {SCHEMA}")
    tasks = [TaskResult(**t) for t in raw.pop("tasks")]
    return EvalReport(tasks=tasks, **raw)


def locate(path: Path) -> Path:
    """``results.json`` itself, ``DIR/results.json`` or a run's ``DIR/eval/results.json``."""
    for candidate in (path, path / RESULTS, path / "eval" / RESULTS):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no {RESULTS} here, in it, or in its eval/ folder; evaluate it first "
                            f"(`swiftk eval {path} --tasks ...`)")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
