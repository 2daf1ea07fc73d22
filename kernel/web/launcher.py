"""The runs ``swiftk web`` started: ``swiftk run CONFIG`` subprocesses, each in its own process group.

A launch writes the config the form built to ``RUNS/_web/NAME.toml`` (validated before, exactly as ``swiftk run``
validates it) and starts ``python -m swiftk run`` on it, its console going to ``RUNS/_web/NAME.log``. Stopping
sends SIGINT to the group, which a run answers by saving a checkpoint and writing ``run_end`` ("interrupted",
resumable with ``--resume``); a run that has not ended after ``grace_s`` gets SIGTERM, then SIGKILL. Runs still
going when the server exits are stopped the same way, so no training outlives the page that started it unseen.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from swiftk.kernel.errors import SwiftkError
from swiftk.kernel.web.workspace import Workspace


class LaunchError(SwiftkError):
    """A launch or stop the page cannot do (a name in use, a run still going, nothing to stop)."""

    exit_code = 2


@dataclass
class Launched:
    name: str
    config: Path
    log: Path
    process: subprocess.Popen[bytes]
    stopping: bool = False  # Stop was asked: the process is saving its checkpoint and will exit

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def exit_text(self) -> str:
        code = self.process.poll()
        if code is None:
            return f"running (pid {self.process.pid})"
        meaning = {0: "completed", 1: "failed", 2: "config error", 3: "paused by its stage", 130: "interrupted "
                   "(resumable)", -signal.SIGTERM: "terminated", -signal.SIGKILL: "killed"}.get(code, "ended")
        return f"exited {code}: {meaning}"


class Launcher:
    def __init__(self, workspace: Workspace, grace_s: float = 60.0) -> None:
        self.workspace = workspace
        self.grace_s = grace_s
        self.runs: dict[str, Launched] = {}
        self.lock = threading.Lock()

    def start(self, name: str, config_text: str, overwrite: bool = False) -> Launched:
        """Write ``config_text`` (already validated) as NAME's config and start ``swiftk run`` on it."""
        run_dir = self.workspace.run_dir(name)
        with self.lock:
            self.refuse_if_running(name, "start it again")
            if run_dir.exists() and not overwrite:
                raise LaunchError(f"{self.workspace.relative(run_dir)} already exists; choose another run name, or "
                                  f"tick 'overwrite' to delete it and start afresh")
            self.workspace.web_dir.mkdir(parents=True, exist_ok=True)
            config = self.config_path(name)
            tmp = config.with_suffix(".toml.tmp")
            tmp.write_text(config_text, encoding="utf-8")
            os.replace(tmp, config)
            return self.spawn(name, config, ["--overwrite"] if overwrite else [], "wb")

    def resume(self, name: str) -> Launched:
        """Continue NAME, launched from this page before, from its latest checkpoint (``swiftk run --resume``)."""
        config = self.config_path(name)
        previous = self.runs.get(name)
        if previous is not None and previous.stopping:
            try:  # Stop was pressed and the run is still saving its checkpoint: resume after it
                previous.process.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                pass
        with self.lock:
            self.refuse_if_running(name, "resume it")
            if not config.is_file():
                raise LaunchError(f"run {name!r} was not launched from this page (no {self.workspace.relative(config)})"
                                  f"; resume it where it was started: swiftk run CONFIG --resume")
            return self.spawn(name, config, ["--resume"], "ab")

    def config_path(self, name: str) -> Path:
        return self.workspace.web_dir / f"{self.workspace.run_dir(name).name}.toml"  # run_dir: a name, not a path

    def refuse_if_running(self, name: str, what: str) -> None:
        """A run still training (started here, or anywhere on this machine per its run_start) cannot be started
        again, resumed or overwritten: two processes would write one run folder."""
        previous = self.runs.get(name)
        pid = previous.process.pid if previous is not None and previous.running else live_pid(self.workspace, name)
        if pid is not None:
            raise LaunchError(f"run {name!r} is running (pid {pid}); stop it before you {what}, or choose another "
                              f"name")

    def spawn(self, name: str, config: Path, flags: list[str], mode: str) -> Launched:
        """``swiftk run CONFIG FLAGS`` in its own process group, its console to RUNS/_web/NAME.log (``mode``: "wb"
        starts the log afresh, "ab" continues it)."""
        log = self.workspace.web_dir / f"{name}.log"
        command = [sys.executable, "-m", "swiftk", "run", str(config), *flags]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log.open(mode) as out:
            process = subprocess.Popen(command, cwd=self.workspace.root, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        launched = Launched(name, config, log, process)
        self.runs[name] = launched
        return launched

    def stop(self, name: str, grace_s: float | None = None) -> str:
        """Interrupt NAME (a checkpoint is saved), escalating if it does not end; what happened, in words. A run
        this page did not start but which runs on this machine is sent SIGINT (Ctrl-C) without waiting."""
        self.workspace.run_dir(name)
        launched = self.runs.get(name)
        if launched is None:
            pid = live_pid(self.workspace, name)
            if pid is None:
                raise LaunchError(f"run {name!r} is not running on this machine; nothing to stop")
            os.kill(pid, signal.SIGINT)
            return (f"{name}: sent Ctrl-C (SIGINT) to pid {pid}, which this page did not start; it stops after its "
                    f"current step, saving a checkpoint")
        if not launched.running:
            return f"{name} is not running: {launched.exit_text()}"
        launched.stopping = True
        signal_until_done([launched.process], self.grace_s if grace_s is None else grace_s)
        return f"{name}: {launched.exit_text()}"

    def running(self) -> list[str]:
        return [name for name, launched in self.runs.items() if launched.running]

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workspace.web_dir / f"{self.workspace.run_dir(name).name}.log"
        if not path.is_file():
            return ""
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
        return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop every run still going, all at once (the server is exiting)."""
        going = [launched for launched in self.runs.values() if launched.running]
        for launched in going:
            launched.stopping = True
        signal_until_done([launched.process for launched in going], grace_s)


def signal_until_done(processes: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGINT to each process's group (a run saves a checkpoint and exits), then SIGTERM after ``grace_s`` and
    SIGKILL 10 s later to the groups still there; every group is signalled at once, waited for against one
    deadline."""
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        left = [p for p in processes if p.poll() is None]
        if not left:
            return
        for process in left:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        for process in left:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def live_pid(workspace: Workspace, name: str) -> int | None:
    """The pid of NAME's main process when its last attempt is running on this machine (its events say so)."""
    from swiftk.kernel.web.runs import RunView

    return RunView(workspace.run_dir(name)).refresh().status().pid


def memory_mib(pid: int) -> float | None:
    """Resident memory of a run's process and its children (ranks, hosts, engines), in MiB."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


_MEMORY: list[tuple[float, str]] = []  # (when, line): one reading serves every browser tab for a few seconds


def machine_memory(max_age_s: float = 5.0) -> str:
    """This machine's memory, and each GPU's when ``nvidia-smi`` is there, in one line (read at most every
    ``max_age_s``)."""
    if _MEMORY and time.monotonic() - _MEMORY[0][0] < max_age_s:
        return _MEMORY[0][1]
    text = read_machine_memory()
    _MEMORY[:] = [(time.monotonic(), text)]
    return text


def read_machine_memory() -> str:
    import shutil

    import psutil

    vm = psutil.virtual_memory()
    text = f"RAM {(vm.total - vm.available) / 2**30:.1f} / {vm.total / 2**30:.1f} GiB used"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used,memory.total",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5).stdout
            for row in out.strip().splitlines():
                index, used, total = (part.strip() for part in row.split(","))
                text += f" · GPU{index} {float(used) / 1024:.1f} / {float(total) / 1024:.1f} GiB"
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
    return text
