"""Run untrusted Python programs (a model's generated code with its tests), each in its own confined child.

Code-execution rewards run whatever the policy wrote, so no program runs in the reward plugin's process. Each
one gets a fresh child built by the repository's sandbox (``swiftk.hosts.sandbox``, SECURITY.md):

* the **launcher** (``python -m swiftk.hosts.sandbox launch POLICY -- ...``) unshares the mount, network, pid,
  ipc and uts namespaces and forks the child as pid 1 of its pid namespace, in a new root that holds only the
  interpreter, the installed packages, swiftk's code and the program's own empty scratch folder;
* the **child** (``python -I -c BOOT``) reads its program from stdin, then :func:`~swiftk.hosts.sandbox.confine`
  applies rlimits (CPU seconds, address space, file size, open files), a uid of its own, ``no_new_privs``,
  Landlock (read-only but scratch, no TCP) and seccomp (no exec, no fork, no sockets but AF_UNIX), and only then
  compiles and runs the program;
* the **parent** (this module, in the reward plugin's process) enforces a wall-clock deadline: past it, it
  SIGKILLs the launcher's process group, and the child, whose parent-death signal is SIGKILL, dies with it.

A program passes when it exits 0 *and* printed the nonce the parent sent it after its last line ran, so that
``sys.exit(0)`` or ``os._exit(0)`` before the tests does not pass. Its output goes to unnamed files bounded by
``RLIMIT_FSIZE``. The parent must be root for the uid and namespaces layers (what ``swiftk sandbox doctor``
calls the core layers): run the code reward in the kernel's process or a plain host, not in a sandboxed one,
whose seccomp filter refuses to start processes at all.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from swiftk.hosts.sandbox import CORE, Policy, namespace_ids
from swiftk.hosts.tenants import SandboxUnavailable, make_private, plan, tenant_uid, visible_paths

log = logging.getLogger(__name__)

UID_BASE = 70000  # programs run as one uid in [70000, 74096): apart from tenants' default [61000, 65096)
OUTPUT_TAIL = 4096  # bytes of stdout and stderr kept per program

# The child: read the nonce and the program, confine itself, run the program, print the nonce. The program's
# own SystemExit is a failure (a model must not pass by exiting early); exec of anything else is refused.
BOOT = """\
import os, sys
nonce = sys.stdin.readline().strip()
source = sys.stdin.read()
sys.stdin = open(os.devnull)
from swiftk.hosts.sandbox import Policy, confine
confine(Policy.from_json(sys.argv[1]))
del Policy, confine
def run(source):
    code = compile(source, "<program>", "exec")
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
try:
    run(source)
except SystemExit as exc:
    print(f"program called exit({exc.code})", file=sys.stderr, flush=True)
    os._exit(3)
sys.stdout.write("\\n" + nonce + "\\n")
sys.stdout.flush()
os._exit(0)
"""


@dataclass(frozen=True)
class Limits:
    """What one program may use. ``cpu_seconds`` and ``memory_mb`` are rlimits inside the child (the memory
    beyond what the interpreter mapped at start); ``timeout_s`` is wall-clock time from spawn, sandbox included."""

    timeout_s: float = 5.0
    memory_mb: int = 512
    cpu_seconds: int = 5
    file_size_mb: int = 16
    open_files: int = 64

    def __post_init__(self) -> None:
        for key in ("timeout_s", "memory_mb", "cpu_seconds", "file_size_mb", "open_files"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class Outcome:
    """How one program ended: ``passed`` (exit 0 after its last line), else why not."""

    passed: bool
    returncode: int | None  # None: killed at the deadline; negative: the signal that ended it
    timed_out: bool
    seconds: float
    stdout: str  # the last OUTPUT_TAIL bytes
    stderr: str


class Executor:
    """Runs programs in parallel confined children (``workers`` at a time) under ``limits``.

    ``require`` names the sandbox layers that must be in effect (default: the core ones, uid, namespaces,
    seccomp and rlimits); every other layer this machine has is applied too, but cgroups (rlimits and the
    deadline bound each program). Without them the constructor raises :class:`SandboxUnavailable`, unless
    ``allow_unsandboxed``: then a child gets what needs no root (rlimits, and seccomp and Landlock when
    available) and a warning says so."""

    def __init__(self, limits: Limits, workers: int = 2, require: list[str] | None = None,
                 allow_unsandboxed: bool = False) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.limits, self.workers = limits, workers
        layers, missing, _ = plan(list(CORE) if require is None else require)
        layers = [layer for layer in layers if layer != "cgroup"]
        if missing:
            why = "; ".join(missing)
            if not allow_unsandboxed:
                raise SandboxUnavailable(
                    f"rewards: code execution needs the sandbox layers {', '.join(require or CORE)}, but this machine "
                    f"lacks: {why}. Run as root on Linux with pyseccomp (`swiftk sandbox doctor` shows each layer), "
                    f"or set allow_unsandboxed = true for a trusted setting.")
            layers = [layer for layer in layers if layer in ("rlimits", "seccomp", "landlock", "no_new_privs")]
            log.warning("rewards: RUNNING MODEL-GENERATED CODE WITHOUT A SANDBOX (allow_unsandboxed = true): only "
                        "%s apply; missing: %s", ", ".join(layers) or "nothing", why)
        self.layers = layers
        self.uid = tenant_uid("rewards.code", UID_BASE, set()) if "uid" in layers else os.geteuid()
        self.readable = visible_paths()
        self.kernel_ns = namespace_ids()
        self.folder = Path(tempfile.mkdtemp(prefix="swiftk-code-"))
        self._open()
        self.start_cost_s = float("nan")
        probe = self.run_one("pass")  # the sandbox works end to end, and what a program costs to start
        if not probe.passed:
            self.close()
            raise SandboxUnavailable(f"rewards: an empty program failed in the sandbox (layers {', '.join(layers)}): "
                                     f"exit {probe.returncode}; {probe.stderr.strip()[-500:]}")
        self.start_cost_s = probe.seconds

    def _open(self) -> None:
        """The folder (the mount point of the children's roots, their scratch folders) and the worker threads;
        :meth:`close` removes them, and the next batch brings them back."""
        (self.folder / "root").mkdir(parents=True, exist_ok=True)
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(self.workers, thread_name_prefix="swiftk-code")
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), ignore_errors=True)

    def run(self, programs: list[str]) -> list[Outcome]:
        """Run every program (``workers`` at a time); outcomes in the same order."""
        if self._pool is None:
            self._open()
        assert self._pool is not None
        return list(self._pool.map(self.run_one, programs))

    def run_one(self, program: str) -> Outcome:
        scratch = Path(tempfile.mkdtemp(prefix="s-", dir=self.folder))
        try:
            make_private(scratch, self.uid)
            with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
                nonce = secrets.token_hex(16)
                stdin.write(f"{nonce}\n{program}".encode())
                stdin.seek(0)
                return self._spawn(self.command(str(scratch)), str(scratch), nonce, stdin, out, err)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def command(self, scratch: str) -> list[str]:
        limits = self.limits
        policy = Policy("rewards.code", self.uid, self.uid, self.layers, scratch, str(self.folder / "root"),
                        readable=self.readable, writable=[scratch], memory_mb=limits.memory_mb,
                        open_files=limits.open_files, file_size_mb=limits.file_size_mb,
                        cpu_seconds_total=limits.cpu_seconds, kernel_ns=self.kernel_ns).to_json()
        child = [sys.executable, "-I", "-c", BOOT, policy]
        if "namespaces" not in self.layers:
            return child
        return [sys.executable, "-m", "swiftk.hosts.sandbox", "launch", policy, "--", *child]

    def _spawn(self, command: list[str], scratch: str, nonce: str, stdin: IO[bytes], out: IO[bytes],
               err: IO[bytes]) -> Outcome:
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        started = time.perf_counter()
        # A new session: the launcher leads a process group that one killpg ends, whatever it forked.
        process = subprocess.Popen(command, stdin=stdin, stdout=out, stderr=err, env=env, cwd=scratch,
                                   start_new_session=True)
        timed_out = False
        try:
            returncode: int | None = process.wait(timeout=self.limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out, returncode = True, None
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # also after a normal exit: nothing of it may linger
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
        seconds = time.perf_counter() - started
        stdout, stderr = _tail(out), _tail(err)
        passed = returncode == 0 and stdout.rstrip().endswith(nonce)
        return Outcome(passed, returncode, timed_out, seconds, stdout, stderr)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._cleanup()


def _tail(file: IO[bytes]) -> str:
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - OUTPUT_TAIL))
    return file.read().decode(errors="replace")
