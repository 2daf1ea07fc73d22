"""Training runs in processes of their own, one step of one run at a time, turn by turn: how the benchmarks compare
frameworks or settings on a machine whose speed drifts.

This VM's speed drifts by +-8 % over minutes, more than most differences the benchmarks measure. Runs made one
after another compare the minutes they ran in as much as the code. In turns, step k of each run is taken within
seconds of the others' (step 1 of each, then step 2 of each..., the order rotating by step), so the drift cancels
out of their ratios; and each run's memory is its own process's, whatever ran before it.

The parent (``Turns``) listens on a Unix socket; each run's process finds it through the ``SWIFTK_BENCH_TURNS``
environment variable (``Turns.env``) and waits at ``GATE.wait()`` before each of its steps, outside the step's
timed window. ``GATE.clock()`` is ``perf_counter`` less the time spent waiting, for wall-clock figures that
leave the turns out. A ``swiftk run`` takes its turns through the plugin file ``PLUGIN`` (this folder on
``PYTHONPATH``); a Python loop calls ``GATE.wait()`` itself. Without the variable, ``GATE`` never waits.
``train_starts`` marks where a run's training begins, for its peak memory above that.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "SWIFTK_BENCH_TURNS"  # "<socket path>\t<run name>\t<steps>"

# A swiftk plugin file: the start of training marked (train_starts), a turn before the first step and between
# steps, each step's end stamped by GATE.clock() into its metrics.jsonl record.
PLUGIN = '''\
from lockstep import GATE, train_starts
from swiftk.contracts import hookimpl

@hookimpl
def swiftk_run_start():
    train_starts()  # the model is loaded: memory is counted from here
    GATE.wait()

@hookimpl
def swiftk_step_end(state, metrics):
    end = GATE.clock()
    GATE.wait()
    return {"bench_step_end_s": end}
'''


class Gate:
    """Where a run waits for its turn before each of its ``steps`` steps (none when not run in turns)."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.left, self.waited = 0, 0.0

    def connect(self, path: str, name: str, steps: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.sendall(f"{name} {os.getpid()}\n".encode())
        self.left = steps

    def wait(self) -> None:
        if self.sock is None and os.environ.get(ENV):
            path, name, steps = os.environ[ENV].split("\t")
            self.connect(path, name, int(steps))
        if self.sock is None or self.left == 0:  # not in turns, or no step left to take
            return
        self.left -= 1
        began = time.perf_counter()
        self.sock.sendall(b"r")
        if self.sock.recv(1) != b"g":
            raise SystemExit("the benchmark's parent process went away")
        self.waited += time.perf_counter() - began

    def clock(self) -> float:
        return time.perf_counter() - self.waited


GATE = Gate()
TRAIN_START_MB: list[float] = []  # the RSS when the current run's training began (train_starts)


def rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process, from Linux /proc (nan elsewhere)."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    except (OSError, StopIteration):
        return float("nan")
    return int(line.split()[1]) / 1024


def train_starts() -> None:
    """Called by a run once its model is loaded and it is about to train: the high-water mark restarts from the
    memory held now (``/proc/self/clear_refs``), so ``rss_mb("VmHWM") - TRAIN_START_MB[0]`` is what training adds
    to the model."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # memory freed by a previous run and the load goes back
    TRAIN_START_MB.append(rss_mb("VmRSS"))
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def process_cpu_s(pid: int) -> float:
    """CPU seconds used by process ``pid`` and its waited-for children so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime, stime, cutime, cstime


def busy_cpu_s() -> float | None:
    """CPU seconds all processes used since boot (Linux /proc/stat; None elsewhere)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


class Turns:
    """The parent's side: ``env(name, steps)`` for each run's process, then ``take`` their steps in turns."""

    def __init__(self, folder: Path) -> None:
        self.path = str(folder / "turns.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen()
        self.server.settimeout(1.0)

    def env(self, name: str, steps: int) -> dict[str, str]:
        return {ENV: f"{self.path}\t{name}\t{steps}"}

    def take(self, names: list[str], steps: int, first: int, finish: Callable[[str], Any],
             dead: Callable[[str], str | None], timeout_s: float = 1800.0) -> tuple[dict[str, Any], float]:
        """Steps 1..``steps`` of the runs ``names``, one at a time, the order rotating by step from ``first``;
        after a run's last step, ``finish(name)`` (waits for the process to end and returns its result). Returns
        the results and the cores that processes other than the runs and this one kept busy meanwhile.
        ``dead(name)``: why run ``name``'s process ended, if it has (asked of runs not yet finished; then this
        raises)."""
        conns: dict[str, socket.socket] = {}
        pids: list[int] = []
        running = set(names)

        def check() -> None:
            if (why := next(filter(None, map(dead, sorted(running))), None)) is not None:
                raise SystemExit(why)

        deadline = time.monotonic() + timeout_s
        while len(conns) < len(names):  # each loads its model, then waits for its first turn
            check()
            if time.monotonic() > deadline:
                raise SystemExit(f"runs that never took their first turn: {set(names) - set(conns)}")
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            hello = b""
            while not hello.endswith(b"\n"):  # byte by byte: the first "r" may follow in the same packet
                hello += conn.recv(1) or b"\n"
            name, pid = hello.decode().split()
            conns[name], pids = conn, [*pids, int(pid)]
        for name, conn in conns.items():
            self.expect(conn, name, check)
        before, own_before, started = busy_cpu_s(), sum(map(process_cpu_s, [os.getpid(), *pids])), time.perf_counter()
        results: dict[str, Any] = {}
        for step in range(steps):
            turn = (first + step) % len(names)
            for name in names[turn:] + names[:turn]:
                conns[name].sendall(b"g")
                if step + 1 < steps:
                    self.expect(conns[name], name, check)  # its next turn: this step is done
                else:
                    results[name] = finish(name)  # the last step, and the rest of the run
                    running.discard(name)
                    conns[name].close()
        after, wall = busy_cpu_s(), time.perf_counter() - started
        own_after = sum(map(process_cpu_s, [os.getpid(), *pids]))  # finished runs count as this one's children
        if before is None or after is None:
            return results, 0.0
        return results, max(after - before - (own_after - own_before), 0.0) / wall

    @staticmethod
    def expect(conn: socket.socket, name: str, check: Callable[[], None]) -> None:
        """Run ``name``'s next "ready"; ``check()`` raises, once a second, if a run's process has ended."""
        conn.settimeout(1.0)
        while True:
            try:
                got = conn.recv(1)
                break
            except TimeoutError:
                check()
        conn.settimeout(None)
        if got != b"r":
            check()
            raise SystemExit(f"the {name} run stopped taking turns")

    def close(self) -> None:
        self.server.close()
        Path(self.path).unlink(missing_ok=True)
