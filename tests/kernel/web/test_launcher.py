"""Runs started from the page are ``swiftk run`` subprocesses that stop as Ctrl-C stops a run."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from swiftk.contracts import events
from swiftk.kernel import starter
from swiftk.kernel.web.launcher import Launcher, LaunchError
from swiftk.kernel.web.runs import RunView
from swiftk.kernel.web.workspace import Workspace

from ...conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    shutil.copytree(REPO / "data", tmp_path / "data")
    return Workspace.at(tmp_path)


def tiny_config(name: str, steps: int) -> str:
    return starter.config_text(starter.Answers(name=name, model="tiny", tuner="full", max_steps=steps))


def test_a_launched_run_trains_stops_with_a_checkpoint_and_resumes_from_it(workspace: Workspace) -> None:
    launcher = Launcher(workspace)
    launched = launcher.start("t1", tiny_config("t1", 5000))
    view = RunView(workspace.runs / "t1")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and view.refresh().status().step < 20:
        assert launched.running, launcher.log_tail("t1")
        time.sleep(0.5)
    status = view.status()
    assert status.state == "running" and status.pid == launched.process.pid and status.total == 5000
    assert launcher.memory_mib(launched.process.pid) > 50
    with pytest.raises(LaunchError, match="already running"):
        launcher.start("t1", tiny_config("t1", 5))
    assert launcher.stop("t1") == "t1: exited 130: interrupted (resumable)"
    records = events.read(workspace.runs / "t1" / "metrics.jsonl")
    assert events.of_kind(records, events.RunEndEvent)[-1].status == "interrupted"
    assert any(events.of_kind(records, events.CheckpointSavedEvent))
    assert view.refresh().status().state == "interrupted"
    assert "interrupted at step" in launcher.log_tail("t1")
    assert (workspace.web_dir / "t1.toml").read_text() == tiny_config("t1", 5000)
    with pytest.raises(LaunchError, match="already exists; choose another run name, or tick 'overwrite'"):
        launcher.start("t1", tiny_config("t1", 5))
    with pytest.raises(LaunchError, match="was not started from this page"):
        launcher.stop("other")
    with pytest.raises(LaunchError, match="was not launched from this page .* swiftk run CONFIG --resume"):
        launcher.resume("other")

    # Resume continues from the checkpoint the stop saved: a second attempt, starting at that step.
    saved = events.of_kind(records, events.CheckpointSavedEvent)[-1].step
    resumed = launcher.resume("t1")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and view.refresh().status().step <= saved + 5:
        assert resumed.running, launcher.log_tail("t1")
        time.sleep(0.5)
    starts = events.of_kind(view.events, events.RunStartEvent)
    assert [s.step for s in starts] == [0, saved] and view.status().state == "running"
    assert launcher.stop("t1").endswith("interrupted (resumable)")
    log = launcher.log_tail("t1", lines=400)
    assert log.count("interrupted at step") == 2  # the resumed attempt's console follows the first one's


def test_shutdown_stops_every_run_still_going(workspace: Workspace) -> None:
    launcher = Launcher(workspace)
    launched = launcher.start("t2", tiny_config("t2", 5000))
    while not (workspace.runs / "t2" / "metrics.jsonl").is_file():
        assert launched.running, launcher.log_tail("t2")
        time.sleep(0.5)
    launcher.shutdown()
    assert launched.process.returncode == 130 and launcher.running() == []
