"""A run as the page shows it, from its typed events and its eval report."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from swiftk.kernel.evals.results import EvalReport, TaskResult, write_report
from swiftk.kernel.progress import Reporter
from swiftk.kernel.web.runs import RunView


def step(n: int, loss: float, **metrics: float) -> dict[str, float]:
    return {"step": n, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0, "tokens": 64, "epoch": 0,
            "elapsed_s": n * 0.5, **metrics}


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_status_follows_the_run_as_it_writes(tmp_path: Path) -> None:
    view = RunView(tmp_path)
    assert view.refresh().status().state == "waiting"
    reporter = Reporter(tmp_path, total_steps=4, mode="none", every=1)
    reporter.event("run_start", step=0, total_steps=4, world_size=1, stage="sft", pid=os.getpid(),
                   host=socket.gethostname())
    reporter.step(step(1, 2.0))
    status = view.refresh().status()
    assert (status.state, status.step, status.total, status.pid) == ("running", 1, 4, os.getpid())
    assert status.line().startswith("running · step 1/4 (25%) · sft · loss 2.0000 · 1,000 tok/s")
    reporter.step(step(2, 1.5, ce=1.5))
    reporter.event("eval", step=2, eval_loss=1.7, eval_exact_match=0.25)
    reporter.event("run_end", step=2, status="interrupted")
    reporter.close()
    status = view.refresh().status()
    assert (status.state, status.step, status.pid) == ("interrupted", 2, None)
    assert view.curve("loss") == [(1, 2.0), (2, 1.5)]
    assert view.curve("ce") == [(2, 1.5)]
    assert view.curve("eval_exact_match") == [(2, 0.25)]
    assert view.metric_names() == ["loss", "lr", "grad_norm", "tokens_per_s", "ce", "eval_loss", "eval_exact_match"]

    # A resumed attempt whose process died without a run_end (killed) is "stopped", not running.
    reporter = Reporter(tmp_path, total_steps=4, mode="none", every=1)
    reporter.event("run_start", step=2, total_steps=4, world_size=1, stage="sft", pid=dead_pid(),
                   host=socket.gethostname())
    reporter.step(step(3, 1.2))
    reporter.close()
    assert view.refresh().status().state == "stopped"


def test_hosts_reloads_tenants_and_eval_results_are_tables(tmp_path: Path) -> None:
    reporter = Reporter(tmp_path, total_steps=4, mode="none", every=1)
    reporter.event("host_dead", step=2, host="process:bad", plugin="bad", pid=41, reason="exited with code 3")
    reporter.event("host_restart", step=3, host="process:bad", plugin="bad", pid=42, reason="died", attempt=1,
                   after_s=0.5)
    reporter.event("plugin_failed", step=3, plugin="loss:bad", hook="swiftk_loss_compute", kind="error",
                   error="Traceback (most recent call last):\n  ...\nValueError: boom", policy="skip", tenant="eve")
    reporter.event("plugin_reload", step=4, plugin="loss:live", old_hash="ab12cd34ef", new_hash="9876543210",
                   ready_ms=120.0, swap_ms=2.5)
    reporter.event("plugin_reload_failed", step=4, plugin="live.py", path="/x/live.py", error="SyntaxError: bad")
    reporter.event("audit", step=0, tenant="eve", plugin="a", action="sandbox_started", reason="confined",
                   layers={"seccomp": "on"})
    reporter.close()
    view = RunView(tmp_path).refresh()
    assert [row[1] for row in view.host_rows()] == [
        "host died", "host restarted (#1, after 0.5 s)", "swiftk_loss_compute failed (error, policy skip)"]
    assert view.host_rows()[2][4] == "ValueError: boom" and view.host_rows()[2][5] == "eve"
    assert [row[2] for row in view.reload_rows()] == ["swapped in", "rejected (old code kept)"]
    assert "ab12cd34 → 98765432" in view.reload_rows()[0][3]
    assert view.audit_rows() == [[0, "eve", "a", "sandbox_started", "confined", "seccomp: on"]]
    assert view.eval_rows() == []
    write_report(EvalReport("run", None, None, "hf", [TaskResult("quickstart", "exact_match", 0.5, 0.2, 6)],
                            "2026-12-05T00:00:00Z", step=4), tmp_path / "eval")
    assert view.eval_rows() == [["quickstart", "exact_match", 0.5, 0.2, 6, 4]]


def test_an_unreadable_file_is_an_error_on_the_view_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "schema": 99}\n')
    view = RunView(tmp_path).refresh()
    assert "newer swiftk" in (view.error or "")
    assert view.status().state == "waiting"
