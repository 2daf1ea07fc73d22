"""Symbolic answer comparison with math-verify, in a worker process the reward can kill.

math-verify (``parse`` then ``verify``) turns both answers into SymPy objects and compares them: fractions,
decimals, LaTeX, sets, intervals, equations. SymPy can take unbounded time and memory on a short adversarial
answer (``(1+x)^{100000}`` expands for minutes), and math-verify's own timeouts use ``signal.alarm``, which
works only in the main thread and cannot interrupt a long C-level operation. So the comparisons run in one
long-lived worker (``python -I judge.py``, only math-verify imported, its address space bounded), in its main
thread with math-verify's timeouts on, while the reward's process waits at most ``timeout_s`` per pair: past
that, the worker is killed, the pair counts as not verified, and the next pair starts a new worker.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading

log = logging.getLogger(__name__)


class MathJudge:
    """``equal(gold, answer)`` through the worker: True or False, None when the worker could not decide in time
    (or died). Thread-safe; the worker starts at the first comparison (about 0.4 s: SymPy's import)."""

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 2048) -> None:
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self._process: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self.in_process = False  # the worker could not be started
        self.restarts = 0  # workers killed at their deadline (the next pair starts a new one)

    def equal(self, gold: str, answer: str) -> bool | None:
        with self._lock:
            if self.in_process:
                return _compare_here(gold, answer, max(1, int(self.timeout_s)))
            try:
                process = self._process or self._start()
            except OSError as exc:  # a sandboxed plugin host may not start processes
                log.warning("rewards: cannot start the math-verify worker (%s); comparing in this process with "
                            "math-verify's signal timeouts, in the main thread only", exc)
                self.in_process = True
                return _compare_here(gold, answer, max(1, int(self.timeout_s)))
            assert process.stdin is not None and process.stdout is not None
            # The first pair also waits for the worker's imports.
            deadline = self.timeout_s + (10.0 if self._process is None else 0.0)
            self._process = process
            try:
                process.stdin.write(json.dumps({"gold": gold, "answer": answer}) + "\n")
                process.stdin.flush()
                ready, _, _ = select.select([process.stdout], [], [], deadline)
                line = process.stdout.readline() if ready else ""
            except OSError:
                line = ""
            if not line:
                log.warning("rewards: math-verify took over %.1f s (or died) comparing %.80r with %.80r; counted as "
                            "not equal, worker restarted", self.timeout_s, answer, gold)
                self._stop()
                self.restarts += 1
                return None
            return bool(json.loads(line)["equal"])

    def _start(self) -> subprocess.Popen[str]:
        seconds = max(1, int(self.timeout_s))
        return subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), str(seconds), str(self.memory_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1"})

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def __del__(self) -> None:
        process = getattr(self, "_process", None)
        if process is not None and process.poll() is None:
            process.kill()


def _wrap(text: str) -> str:
    """math-verify's LaTeX extraction looks for math mode; a bare answer gets it."""
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def _compare(gold: str, answer: str, seconds: int | None) -> bool:
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        parsed_gold = parse(_wrap(gold), parsing_timeout=seconds)
        parsed_answer = parse(_wrap(answer), parsing_timeout=seconds)
        return bool(parsed_gold and parsed_answer and verify(parsed_gold, parsed_answer, timeout_seconds=seconds))
    except (Exception, TimeoutException):  # any failure is "not verified"
        return False


def _compare_here(gold: str, answer: str, seconds: int) -> bool | None:
    """In the reward's process: math-verify's alarms work only in the main thread; elsewhere nothing would bound
    SymPy (a 14-character answer can run for minutes), so nothing is compared there."""
    return _compare(gold, answer, seconds) if threading.current_thread() is threading.main_thread() else None


def serve(parent: int, seconds: int, memory_mb: int) -> None:
    """The worker: one JSON request per line in, one per line out; ends with its parent (stdin closes)."""
    import ctypes
    import resource

    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: a hung worker dies with the reward's process
    if os.getppid() != parent:
        return
    import math_verify  # noqa: F401 - SymPy's import, before the address space is bounded

    logging.disable(logging.WARNING)  # math-verify logs every timeout; the parent reports what matters
    with open("/proc/self/status") as status:
        mapped = next(int(line.split()[1]) << 10 for line in status if line.startswith("VmSize:"))
    limit = mapped + (memory_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for line in sys.stdin:
        request = json.loads(line)
        equal = _compare(request["gold"], request["answer"], seconds)
        sys.stdout.write(json.dumps({"equal": equal}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
