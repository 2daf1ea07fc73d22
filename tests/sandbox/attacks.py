"""Attacks on the sandbox, as a tenant's plugin (tests/sandbox/test_attacks.py runs it as tenant mallory).

``swiftk_reward_compute(prompts=[ACTION, *ARGS])`` tries one action and answers ``"done: ..."`` when it worked
and ``"blocked: <error>"`` when something stopped it; the tests also check from outside that nothing happened.
``swiftk_eval_batch`` attacks the kernel's input tensors: ``num_items_in_batch`` 1 writes into them in place,
2 tries to make their mapping writable, or to reopen their shared memory read-write.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from swiftk.contracts import hookimpl, register_reward

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS = {"socket": 41, "execve": 59, "setuid": 105, "ptrace": 101, "mount": 165, "unshare": 272}  # x86_64
CLONE_NEWUSER = 0x10000000


def raw(name: str, *args: Any) -> None:
    """A system call made directly, around Python's wrappers."""
    if libc.syscall(SYS[name], *args) < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"raw {name}: {os.strerror(code)}")


def fork_bomb() -> str:
    children = 0
    for _ in range(200):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        children += 1
    return f"{children} processes"


def spin() -> None:
    while True:
        pass


def tcp(host: str, port: str) -> None:
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(b"escaped")


def udp(host: str, port: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"escaped", (host, int(port)))


def unix(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(path)
        sock.sendall(b"escaped")


def own_environment(secret: str) -> str:
    if secret.encode() in Path("/proc/self/environ").read_bytes() or secret in str(os.environ):
        return "the kernel's secret"
    raise PermissionError("the secret is not in this host's environment")


def through_link(target: str, write: bool) -> str:
    link = Path(os.environ["HOME"]) / f"link-{abs(hash(target))}"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(target)
    if write:
        link.write_text("escaped")
        return "wrote"
    return link.read_bytes()[:16].decode(errors="replace")


def hard_link(target: str) -> None:
    os.link(target, Path(os.environ["HOME"]) / "hard-link")


def ptrace(pid: str) -> None:
    if libc.ptrace(16, int(pid), 0, 0) != 0:  # PTRACE_ATTACH
        code = ctypes.get_errno()
        raise OSError(code, f"ptrace: {os.strerror(code)}")


ACTIONS = {
    "tcp": tcp,
    "udp": udp,
    "unix_socket": unix,
    "abstract_socket": lambda name: unix("\0" + name),
    "dns": lambda name: socket.getaddrinfo(name, 80),
    "read": lambda path: Path(path).read_bytes()[:16],
    "write": lambda path: Path(path).write_text("escaped"),
    "environment": own_environment,
    "exec_shell": lambda: os.execv("/bin/sh", ["sh", "-c", "echo escaped"]),
    "run_shell": lambda: subprocess.run(["/bin/sh", "-c", "echo escaped"], check=True),
    "fork_bomb": fork_bomb,
    "allocate_gib": lambda gib: len(bytearray(int(gib) << 30)),
    "loop": spin,
    "kill": lambda pid: os.kill(int(pid), signal.SIGKILL),
    "kill_everything": lambda: os.kill(-1, signal.SIGKILL),
    "ptrace": ptrace,
    "raw_socket": lambda: raw("socket", socket.AF_INET, socket.SOCK_STREAM, 0),
    "raw_execve": lambda: raw("execve", b"/bin/sh", None, None),
    "raw_unshare": lambda: raw("unshare", CLONE_NEWUSER),
    "raw_setuid": lambda: raw("setuid", 0),
    "raw_mount": lambda: raw("mount", b"none", os.environ["HOME"].encode(), b"tmpfs", 0, None),
    "link_read": lambda target: through_link(target, write=False),
    "link_write": lambda target: through_link(target, write=True),
    "hard_link": hard_link,
}


@register_reward("attack")
class Attack:
    @hookimpl
    def swiftk_reward_compute(self, prompts: list[str], completions: list[str], references: list[str | None],
                              state: Any) -> dict[str, Any]:
        action, *args = prompts
        try:
            result = ACTIONS[action](*args)
        except BaseException as exc:  # noqa: BLE001 (what stopped the attack is the answer)
            return {"outcome": f"blocked: {type(exc).__name__}: {exc}"}
        return {"outcome": f"done: {result!r:.80}"}

    @hookimpl
    def swiftk_eval_batch(self, batch: Any, outputs: Any, state: Any) -> Any:
        if batch.num_items_in_batch == 1:
            batch.input_ids.fill_(7)  # the mapping is read-only: a write faults
            return "done: wrote in place"
        tries = []
        page = os.sysconf("SC_PAGE_SIZE")
        start = batch.input_ids.data_ptr() // page * page
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(start, page, 3) == 0:  # PROT_READ | PROT_WRITE
            return "done: made the input mapping writable"
        tries.append(f"mprotect: {os.strerror(ctypes.get_errno())}")
        for line in Path("/proc/self/maps").read_text().splitlines():
            if "memfd:swiftk-in" in line:
                try:
                    fd = os.open(f"/proc/self/map_files/{line.split()[0]}", os.O_RDWR)
                    os.pwrite(fd, b"\x07" * 8, 0)
                    return "done: rewrote an input segment"
                except OSError as exc:
                    tries.append(f"reopen: {exc.strerror}")
        return "blocked: " + "; ".join(tries)
