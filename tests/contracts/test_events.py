"""Typed events: every kind survives its metrics.jsonl line, anything else is refused with a clear message, and a
real run writes nothing untyped."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from swiftk.contracts import events
from swiftk.contracts.events import (
    AuditEvent,
    CheckpointSavedEvent,
    EvalEvent,
    EventError,
    HostDiedEvent,
    ResumedEvent,
    RunEndEvent,
    StepEvent,
    from_record,
    make,
    of_kind,
    read,
    steps,
    to_record,
)
from swiftk.kernel.cli import main
from swiftk.kernel.progress import Reporter

from ..conftest import REPO

STEP = StepEvent(step=3, loss=2.5, lr=1e-3, grad_norm=0.7, tokens_per_s=900.0, tokens=512, epoch=0, elapsed_s=1.25,
                 metrics={"ce": 2.5, "rewards/margins": -0.1})
LOOP_RECORD = {k: v for k, v in to_record(STEP).items() if k != "schema"}  # what kernel.loop hands the Reporter
EXAMPLES: list[events.Event] = [STEP, *(make(name, fields) for name, fields in {
    "eval": {"step": 6, "eval_loss": 1.5, "eval_exact_match": 0.25},
    "checkpoint_saved": {"step": 4, "path": "run/checkpoints/step-000004"},
    "resumed": {"step": 4, "path": "run/checkpoints/step-000004"},
    "metrics_truncated": {"step": 4, "dropped_records": 9},
    "stop_requested": {"step": 5, "by": "swiftk_step_end"},
    "run_start": {"step": 0, "total_steps": 450, "world_size": 2, "stage": "sft", "pid": 4100, "host": "node-a"},
    "run_end": {"step": 7, "status": "failed"},
    "run_paused": {"step": 3, "reason": "60% of reward values failed over the last 3 rollouts"},
    "reward_failed": {"step": 3, "plugin": "module:judge", "reward": "judge", "outcome": "timeout", "failed": 16,
                      "count": 16, "error": "did not answer within 3 s"},
    "plugin_code_changed": {"step": 4, "plugin": "loss:focal", "old_hash": "ab12", "new_hash": None},
    "plugin_reload": {"step": 9, "plugin": "loss:live", "old_hash": "ab12", "new_hash": "cd34", "ready_ms": 120.5,
                      "swap_ms": 3.2},
    "plugin_reload_failed": {"step": 9, "plugin": "live.py", "path": "/tmp/live.py", "error": "SyntaxError: ..."},
    "plugin_failed": {"step": 2, "plugin": "loss:bad", "hook": "swiftk_loss_compute", "kind": "error",
                      "error": "boom", "policy": "skip", "tenant": "mallory"},
    "plugin_quarantined": {"step": 2, "plugin": "loss:bad", "hook": "swiftk_loss_compute", "failures": 3,
                           "policy": "skip"},
    "host_dead": {"step": 2, "host": "process:bad", "plugin": "bad", "pid": 4121, "reason": "exited with code 3"},
    "host_restart": {"step": 3, "host": "process:bad", "plugin": "bad", "pid": 4130, "reason": "died",
                     "attempt": 1, "after_s": 0.5},
    "host_shutdown": {"step": 0, "host": "process:bad", "pid": 4130, "escalation": "SIGKILL", "after_s": 5.0},
    "audit": {"step": 0, "tenant": "alice", "plugin": "a", "action": "sandbox_started", "reason": "confined",
              "layers": {"seccomp": "on", "uid": "10001"}},
}.items())]


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.event)
def test_every_kind_round_trips_through_its_line(event: events.Event) -> None:
    line = events.to_line(event)
    record = json.loads(line)
    assert record["schema"] == events.SCHEMA_VERSION and ("event" in record) != isinstance(event, StepEvent)
    assert from_record(record) == event


def test_the_examples_cover_every_kind() -> None:
    assert {type(e) for e in EXAMPLES} == {StepEvent, *events.EVENTS.values()}


def test_metrics_are_flat_and_unset_optionals_are_left_out() -> None:
    assert to_record(STEP) == {"step": 3, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.7, "tokens_per_s": 900.0,
                               "tokens": 512, "epoch": 0, "elapsed_s": 1.25, "ce": 2.5, "rewards/margins": -0.1,
                               "schema": 1}
    dead = to_record(make("host_dead", {"step": 2, "host": "h", "plugin": "p", "pid": None, "reason": "r"}))
    assert "tenant" not in dead and dead["pid"] is None  # an unset optional field is not written; pid is required
    assert from_record(dead) == HostDiedEvent(step=2, host="h", plugin="p", pid=None, reason="r")


def test_an_unknown_kind_a_stray_field_and_a_wrong_type_are_refused() -> None:
    with pytest.raises(EventError, match=r"unknown event 'host_exploded'; the events are audit, checkpoint_saved"):
        make("host_exploded", {"step": 1})
    with pytest.raises(EventError, match=r"unknown event 'host_exploded'"):
        from_record({"event": "host_exploded", "step": 1, "schema": 1})
    with pytest.raises(EventError, match=r"RunEndEvent \('run_end'\) has no field\(s\) \['code'\]"):
        make("run_end", {"step": 1, "status": "failed", "code": 3})
    with pytest.raises(EventError, match=r"\('checkpoint_saved'\) is missing field\(s\) \['path'\]"):
        make("checkpoint_saved", {"step": 1})
    with pytest.raises(EventError, match=r"CheckpointSavedEvent.path: expected str, got PosixPath"):
        make("checkpoint_saved", {"step": 1, "path": Path("x")})
    with pytest.raises(EventError, match=r"StepEvent.metrics\['acc'\]: expected float, got str"):
        events.step_event({**LOOP_RECORD, "acc": "high"})
    with pytest.raises(EventError, match=r"\['event'\] are the record's own keys"):
        make("eval", {"step": 1, "event": 2.0})


def test_a_newer_schema_is_refused_and_an_older_record_is_read() -> None:
    with pytest.raises(EventError, match=r"is of schema 2, written by a newer swiftk; .* upgrade swiftk"):
        from_record({**to_record(STEP), "schema": events.SCHEMA_VERSION + 1})
    old = {"event": "run_end", "step": 7, "status": "failed"}  # written before typed events: no "schema"
    assert from_record(old) == RunEndEvent(step=7, status="failed")


def test_numbers_are_normalised() -> None:
    torch = pytest.importorskip("torch")
    step = events.step_event({**LOOP_RECORD, "loss": torch.tensor(2.0), "lr": 1, "stop_training": True})
    assert (step.loss, step.lr, step.metrics["stop_training"]) == (2.0, 1.0, 1.0)
    assert type(step.loss) is float and type(step.lr) is float
    with pytest.raises(EventError, match=r"StepEvent.tokens: expected int, got float"):
        events.step_event({**LOOP_RECORD, "tokens": 512.0})


def test_read_skips_a_line_still_being_written_and_names_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(events.to_line(STEP) + events.to_line(EXAMPLES[1]) + '{"step": 4, "lo')
    assert read(path) == [STEP, EXAMPLES[1]] and steps(read(path)) == [STEP]
    assert of_kind(read(path), EvalEvent) == [EXAMPLES[1]]
    path.write_text(events.to_line(STEP) + '{"event": "nope", "step": 1}\n')
    with pytest.raises(EventError, match=rf"{path}:2: .*unknown event 'nope'"):
        read(path)


def test_the_reporter_refuses_an_untyped_event_before_writing(tmp_path: Path) -> None:
    reporter = Reporter(tmp_path, total_steps=1, mode="none", every=1)
    reporter.event("audit", step=0, tenant="t", plugin="p", action="sandbox_started", reason="confined")
    with pytest.raises(EventError, match="unknown event 'oops'"):
        reporter.event("oops", step=1)
    with pytest.raises(EventError, match=r"has no field\(s\) \['colour'\]"):
        reporter.event("run_end", step=1, status="completed", colour="red")
    reporter.close()
    assert read(tmp_path / "metrics.jsonl") == [AuditEvent(step=0, tenant="t", plugin="p", action="sandbox_started",
                                                           reason="confined")]


def test_every_event_the_kernel_and_hosts_write_is_typed_with_its_fields() -> None:
    """The writers name events and fields as literals: ``reporter.event("eval", step=...)``,
    ``self.events("host_dead", {"host": ..., ...})``; each must be an event, each field one of its fields."""
    problems, seen = [], set()
    for folder in ("kernel", "hosts"):
        for source in (REPO / folder).rglob("*.py"):
            for name, fields, line in written_events(source):
                seen.add(name)
                cls = events.EVENTS.get(name)
                stray = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)}) if cls else fields
                if cls is None or stray:
                    problems.append(f"{source.relative_to(REPO)}:{line}: {name} {stray}")
    assert len(seen) >= 10 and not problems, problems


def written_events(source: Path) -> list[tuple[str, list[str], int]]:
    """(event name, literal field names, line) of each ``event("name", ...)`` / ``events("name", {...})`` call."""
    found = []
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
            continue
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if func not in ("event", "events") or not isinstance(node.args[0].value, str):
            continue
        fields = [k.arg for k in node.keywords if k.arg is not None]
        if len(node.args) > 1 and isinstance(node.args[1], ast.Dict):
            fields += [k.value for k in node.args[1].keys if isinstance(k, ast.Constant)]
        found.append((node.args[0].value, fields, node.lineno))
    return found


def test_a_tiny_run_writes_only_typed_records(tiny_config: Path, tmp_path: Path) -> None:
    short = ["--set", "train.max_steps=4", "--set", "eval.every=2", "--set", 'log.progress="none"']
    assert main(["run", str(tiny_config), *short]) == 0
    assert main(["run", str(tiny_config), *short[2:], "--set", "train.max_steps=5", "--resume"]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["schema"] == events.SCHEMA_VERSION for line in lines)
    records = read(tmp_path / "run" / "metrics.jsonl")
    assert [r.step for r in steps(records)] == [1, 2, 3, 4, 5]
    assert [e.step for e in of_kind(records, EvalEvent)] == [2, 4, 5]
    assert all("eval_loss" in e.metrics for e in of_kind(records, EvalEvent))
    assert [e.step for e in of_kind(records, CheckpointSavedEvent)] == [4, 5]
    assert [(e.step, e.status) for e in of_kind(records, RunEndEvent)] == [(4, "completed"), (5, "completed")]
    assert [e.step for e in of_kind(records, ResumedEvent)] == [4]


def test_tail_reads_only_what_was_appended_and_restarts_after_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tail = events.Tail(path)
    assert tail.read() == []  # no file yet: no events
    first = [make("run_start", {"step": 0, "total_steps": 9, "world_size": 1, "stage": "sft", "pid": 1,
                                "host": "h"}), STEP]
    path.write_text("".join(map(events.to_line, first)))
    assert tail.read() == first
    assert tail.read() == []
    line = events.to_line(make("run_end", {"step": 3, "status": "completed"}))
    with path.open("a") as handle:
        handle.write(line[:20])  # a line being written is not read yet
        handle.flush()
        assert tail.read() == []
        handle.write(line[20:])
    assert [e.event for e in tail.read()] == ["run_end"]
    assert len(tail.events) == 3
    path.write_text(events.to_line(first[0]))  # a resume rewrote the file shorter
    assert tail.read() == [first[0]] and tail.events == [first[0]]
    other = make("run_start", {"step": 0, "total_steps": 9, "world_size": 1, "stage": "dpo", "pid": 2, "host": "h"})
    with path.open("w") as handle:  # the same inode, longer than what was read: another run's file
        handle.write("".join(map(events.to_line, [other, STEP, STEP])))
    assert tail.read() == [other, STEP, STEP] and tail.events == [other, STEP, STEP]
    path.write_bytes(path.read_bytes() + b'{"step": 4, "loss": "\xff"}\n')
    with pytest.raises(EventError, match="not UTF-8 text after line 3"):
        tail.read()
    path.write_text(events.to_line(first[0]))
    tail.read()
    with path.open("a") as handle:
        handle.write('{"event": "nope", "step": 1}\n')
    for _ in range(2):  # the bad line stays bad, and keeps its number
        with pytest.raises(EventError, match=r"metrics.jsonl:2: .*unknown event 'nope'"):
            tail.read()
