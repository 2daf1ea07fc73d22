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
from dataclasses import dataclass, field
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
    started: float = field(default_factory=time.time)
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
            previous = self.runs.get(name)
            if previous is not None and previous.running:
                raise LaunchError(f"run {name!r} is already running (pid {previous.process.pid}); stop it first or "
                                  f"choose another name")
            if run_dir.exists() and not overwrite:
                raise LaunchError(f"{self.workspace.relative(run_dir)} already exists; choose another run name, or "
                                  f"tick 'overwrite' to delete it and start afresh")
            self.workspace.web_dir.mkdir(parents=True, exist_ok=True)
            config = self.workspace.web_dir / f"{name}.toml"
            tmp = config.with_suffix(".toml.tmp")
            tmp.write_text(config_text, encoding="utf-8")
            os.replace(tmp, config)
            return self.spawn(name, config, ["--overwrite"] if overwrite else [], "wb")

    def resume(self, name: str) -> Launched:
        """Continue NAME, launched from this page before, from its latest checkpoint (``swiftk run --resume``)."""
        config = self.workspace.web_dir / f"{name}.toml"
        with self.lock:
            previous = self.runs.get(name)
            if previous is not None and previous.stopping:
                try:  # Stop was pressed and the run is still saving its checkpoint: resume after it
                    previous.process.wait(timeout=self.grace_s)
                except subprocess.TimeoutExpired:
                    pass
            if previous is not None and previous.running:
                raise LaunchError(f"run {name!r} is running (pid {previous.process.pid}); nothing to resume")
            if not config.is_file():
                raise LaunchError(f"run {name!r} was not launched from this page (no {self.workspace.relative(config)})"
                                  f"; resume it where it was started: swiftk run CONFIG --resume")
            return self.spawn(name, config, ["--resume"], "ab")

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
        """Interrupt NAME (a checkpoint is saved), escalating if it does not end; what happened, in words."""
        launched = self.runs.get(name)
        if launched is None:
            raise LaunchError(f"run {name!r} was not started from this page; stop it where it runs (Ctrl-C)")
        if not launched.running:
            return f"{name} is not running: {launched.exit_text()}"
        grace = self.grace_s if grace_s is None else grace_s
        launched.stopping = True
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(launched.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                launched.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        return f"{name}: {launched.exit_text()}"

    def running(self) -> list[str]:
        return [name for name, launched in self.runs.items() if launched.running]

    def log_tail(self, name: str, lines: int = 40) -> str:
        launched = self.runs.get(name)
        path = launched.log if launched is not None else self.workspace.web_dir / f"{name}.log"
        if not path.is_file():
            return ""
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
        return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])

    def memory_mib(self, pid: int) -> float | None:
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

    def shutdown(self) -> None:
        """Stop every run still going (the server is exiting)."""
        for name in self.running():
            self.stop(name, grace_s=30.0)


def machine_memory() -> str:
    """This machine's memory, and each GPU's when ``nvidia-smi`` is there, in one line."""
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
