"""One run as the page shows it: status and progress, curves, what its hosts, reloads and tenants did, its eval.

Everything comes from the run's typed events (``contracts.events``, followed with ``Tail`` so a refresh reads only
what was appended) and its eval report (``kernel.evals.results``); a ``RunView`` never indexes a raw record.
A run is **running** while its last attempt has a ``run_start`` and no ``run_end`` and its process is alive on
this machine; the same without a live process is **stopped** (killed, or the machine went down): its last
checkpoint can be resumed.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swiftk.contracts import events
from swiftk.contracts.events import (
    AuditEvent,
    EvalEvent,
    HostDiedEvent,
    HostRestartedEvent,
    HostShutdownEvent,
    PluginFailedEvent,
    PluginQuarantinedEvent,
    PluginReloadedEvent,
    PluginReloadRejectedEvent,
    RunEndEvent,
    RunStartEvent,
    StepEvent,
)

HOST_EVENTS = (HostDiedEvent, HostRestartedEvent, HostShutdownEvent, PluginFailedEvent, PluginQuarantinedEvent)
RELOAD_EVENTS = (PluginReloadedEvent, PluginReloadRejectedEvent)
CURVE_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s")  # a step's own figures the page can draw


@dataclass(frozen=True)
class Status:
    state: str  # running, completed, interrupted, paused, failed, stopped, waiting (no record yet)
    step: int
    total: int | None
    stage: str | None
    loss: float | None
    tokens_per_s: float | None
    elapsed_s: float | None
    pid: int | None  # the main process of a running run on this machine (None for one running elsewhere)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0

    def line(self) -> str:
        """One line: ``running · step 37/450 (8%) · loss 1.2345 · 5,120 tok/s · 0:00:12``."""
        parts = [self.state]
        if self.total:
            parts.append(f"step {self.step}/{self.total} ({self.fraction:.0%})")
        elif self.step:
            parts.append(f"step {self.step}")
        if self.stage:
            parts.append(self.stage)
        if self.loss is not None and math.isfinite(self.loss):
            parts.append(f"loss {self.loss:.4f}")
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:,.0f} tok/s")
        if self.elapsed_s is not None:
            minutes, seconds = divmod(int(self.elapsed_s), 60)
            parts.append(f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}")
        return " · ".join(parts)


class RunView:
    """A run folder, followed: ``refresh()`` reads what the run appended since the last call."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.name = run_dir.name
        self.tail = events.Tail(run_dir / "metrics.jsonl")
        self.error: str | None = None  # a metrics file this swiftk cannot read (a newer schema, a broken line)

    @property
    def events(self) -> list[events.Event]:
        return self.tail.events

    def refresh(self) -> RunView:
        try:
            self.tail.read()
            self.error = None
        except events.EventError as exc:
            self.error = str(exc)
        return self

    # -- status ------------------------------------------------------------------------------------------------

    def attempt(self) -> list[events.Event]:
        """The events of the last attempt (from its ``run_start``; all of them for a run written before those)."""
        starts = [i for i, e in enumerate(self.events) if isinstance(e, RunStartEvent)]
        return self.events[starts[-1]:] if starts else self.events

    def status(self) -> Status:
        attempt = self.attempt()
        start = next((e for e in attempt if isinstance(e, RunStartEvent)), None)
        end = next((e for e in reversed(attempt) if isinstance(e, RunEndEvent)), None)
        steps = events.steps(self.events)
        last = steps[-1] if steps else None
        pid = None
        if end is not None:
            state = end.status
        elif start is None and last is None:
            state = "waiting"
        elif start is not None and alive(start):
            state, pid = "running", start.pid if start.host == socket.gethostname() else None
        else:
            state = "stopped"
        return Status(state, last.step if last else (start.step if start else 0),
                      start.total_steps if start else None, start.stage if start else None,
                      last.loss if last else None, last.tokens_per_s if last else None,
                      last.elapsed_s if last else None, pid)

    # -- curves ------------------------------------------------------------------------------------------------

    def metric_names(self) -> list[str]:
        """What can be drawn: the steps' own figures, their plugins' metrics, then the evals' metrics."""
        names: dict[str, None] = {}
        for e in self.events:
            if isinstance(e, StepEvent):
                names.update(dict.fromkeys(CURVE_METRICS))
                names.update(dict.fromkeys(e.metrics))
            elif isinstance(e, EvalEvent):
                names.update(dict.fromkeys(e.metrics))
        return list(names)

    def curve(self, metric: str) -> list[tuple[int, float]]:
        """(step, value) of ``metric`` over the run: a step figure, a plugin's step metric or an eval metric."""
        points = []
        for e in self.events:
            if isinstance(e, StepEvent):
                value = getattr(e, metric) if metric in CURVE_METRICS else e.metrics.get(metric)
            elif isinstance(e, EvalEvent):
                value = e.metrics.get(metric)
            else:
                continue
            if value is not None and math.isfinite(value):
                points.append((e.step, float(value)))
        return points

    # -- what happened -----------------------------------------------------------------------------------------

    def host_rows(self) -> list[list[Any]]:
        """[step, event, host or plugin, pid, what, tenant] per host death, restart, escalation, plugin failure."""
        rows = []
        for e in self.events:
            if isinstance(e, HostDiedEvent):
                rows.append([e.step, "host died", e.host, e.pid, e.reason, e.tenant])
            elif isinstance(e, HostRestartedEvent):
                rows.append([e.step, f"host restarted (#{e.attempt}, after {e.after_s:.1f} s)", e.host, e.pid,
                             e.reason, e.tenant])
            elif isinstance(e, HostShutdownEvent):
                rows.append([e.step, f"host shut down with {e.escalation}", e.host, e.pid,
                             f"after {e.after_s:.1f} s", e.tenant])
            elif isinstance(e, PluginFailedEvent):
                rows.append([e.step, f"{e.hook} failed ({e.kind}, policy {e.policy})", e.plugin, None,
                             first_line(e.error), e.tenant])
            elif isinstance(e, PluginQuarantinedEvent):
                rows.append([e.step, f"{e.hook} quarantined after {e.failures} failures", e.plugin, None,
                             f"policy {e.policy}", e.tenant])
        return rows

    def reload_rows(self) -> list[list[Any]]:
        """[step, plugin, outcome, detail] per hot reload."""
        rows = []
        for e in self.events:
            if isinstance(e, PluginReloadedEvent):
                rows.append([e.step, e.plugin, "swapped in", f"{e.old_hash[:8]} → {e.new_hash[:8]}, ready in "
                             f"{e.ready_ms:.0f} ms, step waited {e.swap_ms:.1f} ms"])
            elif isinstance(e, PluginReloadRejectedEvent):
                rows.append([e.step, e.plugin, "rejected (old code kept)", first_line(e.error)])
        return rows

    def audit_rows(self) -> list[list[Any]]:
        """[step, tenant, plugin, action, reason, layers] per audit record (tenants' sandboxed hosts)."""
        return [[e.step, e.tenant, e.plugin, e.action, first_line(e.reason),
                 ", ".join(f"{k}: {v}" for k, v in (e.layers or {}).items())]
                for e in events.of_kind(self.events, AuditEvent)]

    @property
    def report_path(self) -> Path:
        """Where ``swiftk eval RUN`` and the run's own ``[eval] tasks`` write its latest report."""
        from swiftk.kernel.evals.results import RESULTS

        return self.dir / "eval" / RESULTS

    def eval_report(self) -> Any:
        """The run's latest eval report, or None (none yet, or unreadable: the page shows no results rather than
        failing)."""
        from swiftk.kernel.evals.results import read_report

        if not self.report_path.is_file():
            return None
        try:
            return read_report(self.report_path)
        except Exception:  # a report being rewritten, or of another schema: the next refresh reads it
            return None

    def eval_rows(self) -> list[list[Any]]:
        """[task, metric, value, ± stderr, n, step] of the run's latest eval report (``RUN/eval/results.json``)."""
        report = self.eval_report()
        if report is None:
            return []
        return [[t.task, t.metric, round(t.value, 4), None if t.stderr is None else round(t.stderr, 4), t.n,
                 report.step] for t in report.tasks]


def alive(start: RunStartEvent) -> bool:
    """Whether the process a ``run_start`` names still runs (only knowable on the machine that wrote it)."""
    if start.host != socket.gethostname():
        return True  # another machine's run: trust its file until it writes run_end
    import psutil

    try:
        return psutil.Process(start.pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def first_line(text: str, width: int = 160) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else "")
    return line if len(line) <= width else line[: width - 1] + "…"
