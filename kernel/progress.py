"""What a run reports: ``metrics.jsonl`` records and the console (a rich bar on a TTY, plain lines otherwise).

Every record is a typed event of ``swiftk.contracts.events``, built on every rank (a writer that passes an
unknown event or field fails everywhere at once); only the main process writes them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from swiftk.contracts import events


class MetricsFile:
    """Append-only JSON lines, flushed per record so a crash loses at most the line being written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: TextIO = path.open("a", encoding="utf-8")

    def write(self, event: events.Event) -> None:
        self.handle.write(events.to_line(event))
        self.handle.flush()

    def truncate_after(self, step: int) -> int:
        """Drop the records of steps after ``step`` (a resume from an earlier checkpoint replays them), and a last
        line a crash left half-written.

        Returns how many were dropped. The file is rewritten beside itself and renamed over it.
        """
        self.handle.close()
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n") and line.strip()
                and events.from_record(json.loads(line)).step <= step]
        if len(kept) != len(lines):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self.handle = self.path.open("a", encoding="utf-8")
        return len(lines) - len(kept)

    def close(self) -> None:
        self.handle.close()


class Reporter:
    """Step records and events to ``metrics.jsonl``; progress to the console."""

    def __init__(self, run_dir: Path | None, total_steps: int, mode: str, every: int, start_step: int = 0) -> None:
        self.metrics = MetricsFile(run_dir / "metrics.jsonl") if run_dir else None
        self.total = total_steps
        self.every = every
        self.console = Console(stderr=False)
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.quiet = run_dir is None  # not the main process
        self.mode = "none" if self.quiet else mode
        self.bar: Progress | None = None
        self.task = None
        self.start_step = start_step
        self.started = time.perf_counter()
        if self.mode == "rich":
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[tok_s]} tok/s  lr {task.fields[lr]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, loss="-", tok_s="-", lr="-")
            self.bar.start()

    def resume_at(self, step: int) -> None:
        """A resumed run starts at ``step``: later records of an earlier attempt are dropped from
        metrics.jsonl, and the bar and the ETA count from there."""
        if self.metrics:
            dropped = self.metrics.truncate_after(step)
            if dropped:
                self.event("metrics_truncated", step=step, dropped_records=dropped)
        self.start_step = step
        self.started = time.perf_counter()
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=step)

    def step(self, record: dict[str, Any]) -> None:
        """The loop's flat step record (kernel fields and plugin metrics), written as a ``StepEvent``."""
        event = events.step_event(record)
        if self.metrics:
            self.metrics.write(event)
        step = event.step
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=step, loss=f"{event.loss:.4f}",
                            tok_s=f"{event.tokens_per_s:,.0f}", lr=f"{event.lr:.2e}")
        elif self.mode == "plain" and (step % self.every == 0 or step == self.total):
            done = step - self.start_step
            elapsed = time.perf_counter() - self.started
            eta = elapsed / done * (self.total - step) if done else math.nan
            print(
                f"step {step}/{self.total}  loss {event.loss:.4f}  lr {event.lr:.2e}  "
                f"grad_norm {event.grad_norm:.3f}  {event.tokens_per_s:,.0f} tok/s  ETA {format_eta(eta)}",
                flush=True,
            )

    def event(self, name: str, **fields: Any) -> None:
        """The typed event ``name`` (``contracts.events.EVENTS``); an unknown name or field raises here."""
        event = events.make(name, fields)
        if self.metrics:
            self.metrics.write(event)

    def say(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.metrics:
            self.metrics.close()


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
