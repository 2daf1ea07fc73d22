"""Runs started from the page are ``swiftk run`` subprocesses that stop as Ctrl-C stops a run."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swiftk.contracts import events
from swiftk.kernel import starter
from swiftk.kernel.web.launcher import Launcher, LaunchError, memory_mib
from swiftk.kernel.web.runs import RunView
from swiftk.kernel.web.workspace import PathRefused, Workspace

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
    assert memory_mib(launched.process.pid) > 50
    with pytest.raises(LaunchError, match="is running .* stop it before you start it again"):
        launcher.start("t1", tiny_config("t1", 5), overwrite=True)
    assert launcher.stop("t1") == "t1: exited 130: interrupted (resumable)"
    records = events.read(workspace.runs / "t1" / "metrics.jsonl")
    assert events.of_kind(records, events.RunEndEvent)[-1].status == "interrupted"
    assert any(events.of_kind(records, events.CheckpointSavedEvent))
    assert view.refresh().status().state == "interrupted"
    assert "interrupted at step" in launcher.log_tail("t1")
    assert (workspace.web_dir / "t1.toml").read_text() == tiny_config("t1", 5000)
    with pytest.raises(LaunchError, match="already exists; choose another run name, or tick 'overwrite'"):
        launcher.start("t1", tiny_config("t1", 5))
    with pytest.raises(LaunchError, match="'other' is not running on this machine"):
        launcher.stop("other")
    for bad in ("/tmp/evil", "../evil", "a/b"):  # a name, never a path
        with pytest.raises(PathRefused, match="run name"):
            launcher.resume(bad)
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


def test_a_run_started_elsewhere_is_stopped_by_its_pid_and_cannot_be_overwritten_meanwhile(
        workspace: Workspace) -> None:
    config = workspace.root / "t3.toml"
    config.write_text(tiny_config("t3", 5000))
    process = subprocess.Popen([sys.executable, "-m", "swiftk", "run", str(config)], cwd=workspace.root,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        view = RunView(workspace.runs / "t3")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and view.refresh().status().step < 5:
            assert process.poll() is None
            time.sleep(0.5)
        launcher = Launcher(workspace)  # a page that did not start it (or was restarted)
        with pytest.raises(LaunchError, match=f"'t3' is running \\(pid {process.pid}\\)"):
            launcher.start("t3", tiny_config("t3", 5), overwrite=True)
        assert "sent Ctrl-C (SIGINT) to pid" in launcher.stop("t3")
        assert process.wait(timeout=120) == 130
        assert view.refresh().status().state == "interrupted"
    finally:
        if process.poll() is None:
            process.kill()
