"""Everything a run writes to ``metrics.jsonl``, as typed records, and their JSON-lines form.

One record per line. A **step** record has no ``"event"`` key: the kernel's numbers (``step``, ``loss``, ``lr``...)
and the plugins' metrics side by side. Every other record is an **event**: ``{"event": name, "step": ..., ...}``.
Every record ends with ``"schema": SCHEMA_VERSION``.

Writers build records here (the kernel's ``Reporter`` calls ``make(name, fields)`` and ``step_event(record)``);
readers (``swiftk plot``, benches, tests, the web UI) get typed records back from ``read`` / ``from_record`` (or
``Tail``, which follows a live run's file) and never index raw dicts. The rules:

- **Every field is declared.** An unknown event name, a field the event does not have, a missing field or a value
  of the wrong type is an ``EventError`` at once, before anything is written. There is no free ``extra`` dict:
  a host event that gains a field gains it here. The only free-form part is ``metrics`` (``StepEvent``,
  ``EvalEvent``): float metrics named by plugins, written flat into the record beside the declared fields
  (so ``{"step": 3, "loss": 2.1, ..., "ce": 2.1}``); a metric may not reuse a declared field's name, ``event``
  or ``schema``.
- Numbers are normalised on the way in: a float field takes an int or anything with ``__float__`` (a 0-dim
  tensor, a numpy scalar); an int field takes only an int. An optional field left at None is not written.
- **Versions.** A record without ``"schema"`` was written before typed events existed (schema 0, the same
  layout): it is read. A record of a newer schema than this module's is refused with an ``EventError`` that
  says to upgrade swiftk. A change that readers must tell apart (a renamed or retyped field) raises
  ``SCHEMA_VERSION`` and adds its upgrade to ``_upgrade``; a new optional field does not.

This module imports nothing from the kernel or the hosts: a host, the web UI or a notebook can read a run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin

SCHEMA_VERSION = 1
RESERVED = ("event", "schema")  # record keys of the layout itself, never a field or a metric


class EventError(ValueError):
    """A record that is not one of the events below (unknown kind, wrong fields or types, newer schema)."""


@dataclass(frozen=True, kw_only=True)
class Event:
    """What every record has: the optimizer step it happened at (0: before the first step)."""

    event: ClassVar[str]  # the record's "event" value; "step" for StepEvent, whose records carry none
    step: int

    def __post_init__(self) -> None:
        for name, hint, _ in _layout(type(self)):
            object.__setattr__(self, name, _typed(getattr(self, name), hint, f"{type(self).__name__}.{name}"))
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            clash = sorted(set(metrics) & (_names(type(self)) | set(RESERVED)))
            if clash:
                raise EventError(f"{type(self).__name__}: metric names {clash} clash with the record's own fields; "
                                 f"rename the metric")


# -- training ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class StepEvent(Event):
    """One optimizer step, written by the loop after ``swiftk_step_end``."""

    event: ClassVar[str] = "step"
    loss: float  # the step's mean loss over every rank's label tokens (or pairs)
    lr: float  # the learning rate the step used
    grad_norm: float  # before clipping
    tokens_per_s: float  # this step, every rank together
    tokens: int  # this step, every rank together
    epoch: int
    elapsed_s: float  # training time so far (resumes included, evals and checkpoints excluded)
    metrics: dict[str, float] = field(default_factory=dict)  # plugins' (loss, step_end) and this step's eval metrics


@dataclass(frozen=True, kw_only=True)
class EvalEvent(Event):
    """An eval pass finished; ``metrics`` holds the kernel's and the metric plugins' (``eval_loss``...)."""

    event: ClassVar[str] = "eval"
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class CheckpointSavedEvent(Event):
    event: ClassVar[str] = "checkpoint_saved"
    path: str  # the checkpoint folder (run_dir/checkpoints/step-N)


@dataclass(frozen=True, kw_only=True)
class ResumedEvent(Event):
    event: ClassVar[str] = "resumed"
    path: str  # the checkpoint the run resumed from


@dataclass(frozen=True, kw_only=True)
class MetricsTruncatedEvent(Event):
    """A resume from an earlier checkpoint dropped the later records of the previous attempt."""

    event: ClassVar[str] = "metrics_truncated"
    dropped_records: int


@dataclass(frozen=True, kw_only=True)
class StopRequestedEvent(Event):
    """A plugin asked the run to end after this step (``{"stop_training": 1.0}`` from ``swiftk_step_end``)."""

    event: ClassVar[str] = "stop_requested"
    by: str  # the hook that asked


@dataclass(frozen=True, kw_only=True)
class RunStartEvent(Event):
    """The first record of every attempt (a resume writes another at the step it resumed from): what a reader
    needs to show progress and to tell a live run from a dead one."""

    event: ClassVar[str] = "run_start"
    total_steps: int  # the step the run ends at
    world_size: int
    stage: str  # the stage's name: sft, dpo, grpo...
    pid: int  # the main process (rank 0)
    host: str  # the machine it runs on (a pid means nothing elsewhere)


@dataclass(frozen=True, kw_only=True)
class RunEndEvent(Event):
    """The last record of every attempt, written even when training raised."""

    event: ClassVar[str] = "run_end"
    status: str  # "completed", "interrupted", "paused" or "failed"


@dataclass(frozen=True, kw_only=True)
class RunPausedEvent(Event):
    """A stage stopped the run for the user to fix something (``contracts.rewards.PauseRun``); a checkpoint of
    this step was saved, and ``--resume`` continues from it."""

    event: ClassVar[str] = "run_paused"
    reason: str


# -- plugin code ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class PluginCodeChangedEvent(Event):
    """At a resume: a plugin's code differs from the code the checkpoint recorded."""

    event: ClassVar[str] = "plugin_code_changed"
    plugin: str
    old_hash: str | None  # None: the checkpoint did not know this plugin
    new_hash: str | None  # None: the plugin is no longer configured


@dataclass(frozen=True, kw_only=True)
class PluginReloadedEvent(Event):
    """Hot reload swapped edited code in at this step boundary."""

    event: ClassVar[str] = "plugin_reload"
    plugin: str
    old_hash: str
    new_hash: str
    ready_ms: float  # from the save to the new code being ready to swap
    swap_ms: float  # what the step boundary waited


@dataclass(frozen=True, kw_only=True)
class PluginReloadRejectedEvent(Event):
    """An edit failed to import or failed its probe; the old code keeps running."""

    event: ClassVar[str] = "plugin_reload_failed"
    plugin: str  # the edited file's name
    path: str
    error: str  # the traceback or the probe's complaint


@dataclass(frozen=True, kw_only=True)
class RewardFailedEvent(Event):
    """A reward plugin's scores for one rollout were not all usable (``contracts.rewards``): the failed values
    are NaN and reach no advantage."""

    event: ClassVar[str] = "reward_failed"
    plugin: str
    reward: str  # the reward's name ("?" when the plugin returned nothing usable)
    outcome: str  # invalid, timeout or crashed
    failed: int  # completions whose value failed
    count: int  # completions scored
    error: str


# -- plugin hosts (kernel.run's host sink; ``tenant`` is set for a tenant's sandboxed host) --------------------

@dataclass(frozen=True, kw_only=True)
class PluginFailedEvent(Event):
    event: ClassVar[str] = "plugin_failed"
    plugin: str
    hook: str
    kind: str  # "error" (the host lives) or "host_dead"
    error: str
    policy: str  # the hook's on_failure policy that answered: fail, skip, retry or fallback
    tenant: str | None = None


@dataclass(frozen=True, kw_only=True)
class PluginQuarantinedEvent(Event):
    event: ClassVar[str] = "plugin_quarantined"
    plugin: str
    hook: str
    failures: int  # within the policy's window
    policy: str
    tenant: str | None = None


@dataclass(frozen=True, kw_only=True)
class HostDiedEvent(Event):
    event: ClassVar[str] = "host_dead"
    host: str
    plugin: str  # the host's plugins, comma-separated
    pid: int | None
    reason: str
    tenant: str | None = None


@dataclass(frozen=True, kw_only=True)
class HostRestartedEvent(Event):
    event: ClassVar[str] = "host_restart"
    host: str
    plugin: str
    pid: int | None  # the new process
    reason: str
    attempt: int  # deaths so far
    after_s: float  # the backoff it waited
    tenant: str | None = None


@dataclass(frozen=True, kw_only=True)
class HostShutdownEvent(Event):
    """A host did not leave when told to: the supervisor escalated to a signal."""

    event: ClassVar[str] = "host_shutdown"
    host: str
    pid: int | None
    escalation: str  # SIGTERM or SIGKILL
    after_s: float
    tenant: str | None = None


@dataclass(frozen=True, kw_only=True)
class AuditEvent(Event):
    """The sandbox's trail: what a tenant's host got when it started, and everything the sandbox stopped."""

    event: ClassVar[str] = "audit"
    tenant: str
    plugin: str
    action: str  # "sandbox_started", or the host event it accompanies (plugin_failed, host_dead...)
    reason: str
    layers: dict[str, str] | None = None  # sandbox_started: layer -> what the host got


EVENTS: dict[str, type[Event]] = {cls.event: cls for cls in (
    EvalEvent, CheckpointSavedEvent, ResumedEvent, MetricsTruncatedEvent, StopRequestedEvent, RunStartEvent,
    RunEndEvent, RunPausedEvent, RewardFailedEvent, PluginCodeChangedEvent, PluginReloadedEvent,
    PluginReloadRejectedEvent, PluginFailedEvent, PluginQuarantinedEvent, HostDiedEvent, HostRestartedEvent,
    HostShutdownEvent, AuditEvent,
)}  # by the name writers pass to Reporter.event; StepEvent is written by Reporter.step

E = TypeVar("E", bound=Event)


# -- writing -------------------------------------------------------------------------------------------------

def make(name: str, fields: Mapping[str, Any]) -> Event:
    """The event ``name`` with ``fields`` (what ``Reporter.event(name, **fields)`` writes)."""
    cls = EVENTS.get(name)
    if cls is None:
        raise EventError(f"unknown event {name!r}; the events are {', '.join(sorted(EVENTS))} "
                         f"(a new one is a new record in swiftk/contracts/events.py)")
    return _build(cls, fields)


def step_event(record: Mapping[str, Any]) -> StepEvent:
    """The loop's flat step record as a ``StepEvent``: declared fields by name, every other key a metric."""
    return _build(StepEvent, record)


def to_record(event: Event) -> dict[str, Any]:
    """The JSON-ready dict of one ``metrics.jsonl`` line (metrics flattened, unset optional fields left out)."""
    record: dict[str, Any] = {} if isinstance(event, StepEvent) else {"event": event.event}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if f.name == "metrics":
            record.update(value)
        elif value is not None or f.default is not None:
            record[f.name] = dict(value) if isinstance(value, dict) else value
    record["schema"] = SCHEMA_VERSION
    return record


def to_line(event: Event) -> str:
    return json.dumps(to_record(event)) + "\n"


# -- reading -------------------------------------------------------------------------------------------------

def from_record(record: Mapping[str, Any]) -> Event:
    """The typed event of one parsed ``metrics.jsonl`` line; ``EventError`` for anything else."""
    if not isinstance(record, Mapping):
        raise EventError(f"a metrics record must be a JSON object, got {type(record).__name__}")
    version = record.get("schema", 0)
    if not _is_int(version) or version < 0:
        raise EventError(f"record {_short(record)}: 'schema' must be a non-negative integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise EventError(f"record {_short(record)} is of schema {version}, written by a newer swiftk; this one "
                         f"reads schemas up to {SCHEMA_VERSION}: upgrade swiftk to read this run")
    body = _upgrade({k: v for k, v in record.items() if k not in RESERVED}, version)
    name = record.get("event")
    if name is None:
        return _build(StepEvent, body)
    if not isinstance(name, str) or name not in EVENTS:
        raise EventError(f"record {_short(record)}: unknown event {name!r}; this swiftk knows "
                         f"{', '.join(sorted(EVENTS))}")
    return _build(EVENTS[name], body)


def read(path: str | Path) -> list[Event]:
    """Every record of a ``metrics.jsonl``, in order. A last line without its newline is still being written
    (the run is live) and is left out; any other bad line is an ``EventError`` naming the file and line."""
    text = Path(path).read_text(encoding="utf-8")
    return _parse(text.split("\n")[:-1], path, 1)  # a complete line ends with "\n"; what follows is partial


def _parse(lines: list[str], path: str | Path, first: int) -> list[Event]:
    """The events of complete ``lines`` of ``path``, the first being line number ``first``."""
    events = []
    for number, line in enumerate(lines, first):
        if not line.strip():
            continue
        try:
            events.append(from_record(json.loads(line)))
        except (EventError, json.JSONDecodeError) as exc:
            raise EventError(f"{path}:{number}: {exc}") from None
    return events


class Tail:
    """A ``metrics.jsonl`` read as it grows: each ``read()`` parses only the complete lines appended since the last,
    so following a live run costs what it wrote, not its whole history. A file that shrank (a resume rewrote it
    without the dropped steps), was replaced, or starts differently (deleted and written again, even under the
    same inode) is read again from its start: ``events`` then holds the new history and ``read()`` returns all of
    it. A missing file is no events yet."""

    HEAD = 256  # bytes of the file's start that identify it (its first record)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.events: list[Event] = []
        self._offset = 0
        self._line = 0
        self._identity: tuple[int, int, bytes] | None = None

    def read(self) -> list[Event]:
        """The events appended since the last call (or every event, after the file was rewritten)."""
        try:
            with self.path.open("rb") as handle:
                stat = os.fstat(handle.fileno())
                size = stat.st_size
                head = handle.read(min(size, self.HEAD))
                known = self._identity
                shared = min(len(head), len(known[2])) if known is not None else 0
                if known is None or known[:2] != (stat.st_dev, stat.st_ino) or size < self._offset \
                        or known[2][:shared] != head[:shared]:
                    self._identity, self._offset, self._line, self.events = (stat.st_dev, stat.st_ino, head), 0, 0, []
                elif len(head) > len(known[2]):
                    self._identity = (stat.st_dev, stat.st_ino, head)
                if size == self._offset:
                    return []
                handle.seek(self._offset)
                chunk = handle.read(size - self._offset)
        except FileNotFoundError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a last line without its newline is still being written
        try:
            lines = complete.decode("utf-8").split("\n")[:-1]
        except UnicodeDecodeError as exc:
            raise EventError(f"{self.path}: not UTF-8 text after line {self._line} ({exc.reason})") from None
        new = _parse(lines, self.path, self._line + 1)  # a bad line raises: the next read() tries it again
        self._line += len(lines)
        self._offset += len(complete)
        self.events += new
        return new


def steps(events: Iterable[Event]) -> list[StepEvent]:
    """The step records, in order."""
    return of_kind(events, StepEvent)


def of_kind(events: Iterable[Event], kind: type[E]) -> list[E]:
    """The events of one kind, in order: ``of_kind(events, EvalEvent)``."""
    return [e for e in events if isinstance(e, kind)]


# -- checking ------------------------------------------------------------------------------------------------

def _upgrade(body: dict[str, Any], version: int) -> dict[str, Any]:
    """A record of an older schema in this schema's layout. Schema 0 (no "schema" key) has the same layout."""
    return body


def _build(cls: type[E], fields: Mapping[str, Any]) -> E:
    names = _names(cls)
    if "metrics" in names:  # undeclared keys are the plugins' metrics
        reserved = sorted(set(fields) & set(RESERVED))
        if reserved:
            raise EventError(f"{cls.__name__}: {reserved} are the record's own keys, not metric names")
        declared = {k: v for k, v in fields.items() if k in names and k != "metrics"}
        metrics = {k: v for k, v in fields.items() if k not in names}
        fields = {**declared, "metrics": metrics}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise EventError(f"{cls.__name__} ({cls.event!r}) has no field(s) {unknown}; its fields are "
                         f"{sorted(names)} (a new field is a new line in swiftk/contracts/events.py)")
    missing = [name for name, _, required in _layout(cls) if required and name not in fields]
    if missing:
        raise EventError(f"{cls.__name__} ({cls.event!r}) is missing field(s) {missing}")
    return cls(**fields)


_LAYOUTS: dict[type[Any], list[tuple[str, Any, bool]]] = {}


def _layout(cls: type[Any]) -> list[tuple[str, Any, bool]]:
    """(name, type hint, required) per field of an event class, computed once per class."""
    if cls not in _LAYOUTS:
        hints = typing.get_type_hints(cls)
        _LAYOUTS[cls] = [(f.name, hints[f.name], f.default is dataclasses.MISSING
                          and f.default_factory is dataclasses.MISSING) for f in dataclasses.fields(cls)]
    return _LAYOUTS[cls]


def _names(cls: type[Any]) -> set[str]:
    return {name for name, _, _ in _layout(cls)}


def _typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against ``hint`` (numbers normalised); ``EventError`` naming ``where``."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(hint):
            return None
        (hint,) = [option for option in get_args(hint) if option is not type(None)]
        origin = get_origin(hint)
    if hint is float:
        if _is_number(value):
            try:
                return float(value)
            except (TypeError, ValueError, RuntimeError):  # e.g. a tensor of more than one element
                pass
    elif hint is int:
        if _is_int(value):
            return int(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is dict and isinstance(value, Mapping):
        _, item = get_args(hint)
        if all(isinstance(k, str) for k in value):
            return {k: _typed(v, item, f"{where}[{k!r}]") for k, v in value.items()}
    raise EventError(f"{where}: expected {_hint_name(hint)}, got {type(value).__name__} {_short(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int, a float, a bool (a flag such as stop_training) or anything that converts (a 0-dim tensor)."""
    return isinstance(value, (int, float)) or (hasattr(value, "__float__") and not isinstance(value, str))


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def _short(value: Any, width: int = 120) -> str:
    text = repr(dict(value)) if isinstance(value, Mapping) else repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"
