"""A plugin host's process life, as the kernel drives it: spawn, watch, kill, stop, and the backoff between a
death and the next start. No process or segment outlives it.

The host is spawned (``python -m swiftk.hosts``, never forked: forking after torch started threads deadlocks),
in its own session so that a kill reaches whatever the plugin started. A stop escalates like jupyter_client's:
``ShutdownRequest``, wait, SIGTERM, wait, SIGKILL, each escalation logged. A tenant's host runs in its sandbox,
which is kept across restarts (folders, cgroups, policy).
"""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from swiftk.contracts.errors import HostDeadError
from swiftk.hosts import messages as m
from swiftk.hosts.channel import Channel
from swiftk.hosts.settings import HostSettings
from swiftk.hosts.tenants import Sandbox, Tenant
from swiftk.hosts.transport import Transport

EventSink = Callable[[str, dict[str, Any]], None]
_SPAWNED = itertools.count()

SHARED_DEAD = ("its shared host is gone: a host shared by a node's ranks is not restarted (the node's other ranks "
               "hold sessions with the dead one); its plugin's failure policy applies from now on. Use shared = "
               "\"rank\" (one host per rank) for plugins that must come back")


@dataclass(frozen=True)
class SharedSlot:
    """A host shared by the ranks of a node (``shared = "node"``): the node's first rank starts it, and every
    other rank is one more session of it, on endpoints named after ``base`` and its local rank. The token the
    host answers with travels through the process group's store (``publish`` / ``fetch``)."""

    base: str
    local_rank: int
    local_world_size: int
    publish: Callable[[str, str], None]
    fetch: Callable[[str, float], str]

    def endpoint(self, rank: int, suffix: str) -> str:
        return f"ipc://@{self.base}-{rank}-{suffix}"

    def channel(self, rank: int) -> str:
        return f"{self.base}-{rank}-fd"

    @property
    def token_key(self) -> str:
        return f"swiftk/shared/{self.base}/token"


@dataclass(frozen=True)
class HostSpec:
    """One host process: the plugin sources it imports (one, or a config ``group``) and its memory limit. A
    tenant's host runs sandboxed (``swiftk.hosts.sandbox``) with ``layers``."""

    label: str
    sources: list[str]
    names: list[str]
    memory_mb: int | None = None
    tenant: Tenant | None = None
    layers: tuple[str, ...] = ()
    shared: SharedSlot | None = None


def console(event: str, fields: dict[str, Any]) -> None:
    """The default event sink: one line on stderr."""
    detail = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("traceback",))
    print(f"swiftk: {event}: {detail}", file=sys.stderr, flush=True)


def tenant_events(events: EventSink, tenant: str) -> EventSink:
    """Events of a tenant's host name the tenant: the kernel records them as audit records."""
    def sink(event: str, fields: dict[str, Any]) -> None:
        events(event, {"tenant": tenant, **fields})
    return sink


class HostProcess:
    """One host process and what it holds: its session's ``channel`` (new at each spawn) and its ``tensors``
    (kept across restarts). ``deaths`` counts consecutive deaths; a successful call resets it."""

    channel: Channel

    def __init__(self, spec: HostSpec, settings: HostSettings, context: zmq.Context[Any],
                 events: EventSink = console) -> None:
        self.spec, self.settings, self.context = spec, settings, context
        self.events = events if spec.tenant is None else tenant_events(events, spec.tenant.name)
        self.sandbox: Sandbox | None = None
        self.oom_kills = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.tensors = Transport()
        self.deaths = 0  # consecutive, reset by a successful call
        self.dead_at = 0.0
        self.closed = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def spawn(self) -> None:
        tenant = self.spec.tenant
        if tenant is not None and self.sandbox is None:  # kept across restarts: folders, cgroups, policy
            self.sandbox = Sandbox(tenant, self.spec.sources, list(self.spec.layers),
                                   f"swiftk-{os.getpid()}-{next(_SPAWNED)}")
        # A sandboxed host is in another network namespace, where abstract sockets are not the kernel's: its
        # sockets are files in a folder only the tenant's uid may enter.
        base = (self.sandbox.endpoint("h") if self.sandbox is not None
                else f"ipc://@swiftk-{os.getpid()}-{next(_SPAWNED)}-{secrets.token_hex(4)}")
        self.channel = self.bind(lambda suffix: f"{base}-{suffix}")
        link, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channel.connect(link)
        self.token = secrets.token_hex(16)
        command = [sys.executable, "-m", "swiftk.hosts", "--heartbeat", f"{base}-hb", "--control", f"{base}-ctl",
                   "--fd", str(child.fileno()), "--parent",
                   str(os.getpid() if self.sandbox is None else 0),
                   "--heartbeat-interval", str(self.settings.heartbeat_interval_s),
                   "--spin-us", str(self.settings.spin_us)]
        if threading.current_thread() is not threading.main_thread():
            command.append("--no-death-signal")
        if self.spec.memory_mb and self.sandbox is None:  # a sandbox sets its own limits
            command += ["--memory-mb", str(self.spec.memory_mb)]
        shared = self.spec.shared
        if shared is not None:  # the node's other ranks: one more session each
            for rank in range(1, shared.local_world_size):
                command += ["--guest", shared.endpoint(rank, "hb"), shared.endpoint(rank, "ctl"),
                            shared.channel(rank)]
            shared.publish(shared.token_key, self.token)
        # Passive OpenMP waits: a host that spins after its call would steal the cores the kernel needs next.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "SWIFTK_HOST_TOKEN": self.token}
        stdin = None
        if self.sandbox is not None:  # the launcher builds the namespaces and forks the host inside them
            command, env, stdin = self.sandbox.command(command), self.sandbox.env(self.token), subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(command, pass_fds=(child.fileno(),), env=env, start_new_session=True,
                                         stdin=stdin)
        except BaseException:
            self.channel.close()
            raise
        finally:
            child.close()
        self.tensors.forget_host()
        self.channel.last_beat = time.monotonic()

    def bind(self, endpoint: Callable[[str], str]) -> Channel:
        """A new session's sockets at ``endpoint(...)``, owned by the tenant's uid when sandboxed."""
        own = self.sandbox.own_socket if self.sandbox is not None else None
        return Channel(self.context, self.settings, self.spec.label, self, endpoint, own)

    def wait_backoff(self) -> float:
        """Sleep until the backoff after the last death is over (``restart_backoff_s``, doubling with each
        consecutive death, at most ``max_backoff_s``); the backoff."""
        delay = min(self.settings.restart_backoff_s * 2.0 ** max(self.deaths - 1, 0), self.settings.max_backoff_s)
        wait = self.dead_at + delay - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        return delay

    def cpu_watch(self, what: str, label: str) -> Callable[[], None] | None:
        """For a tenant with ``cpu_seconds_per_call``: a check, called while ``what`` runs, that kills the host
        once the call used more CPU than that, as its cgroup counts; None without a budget or a cgroup."""
        tenant, cgroups = self.spec.tenant, self.sandbox.cgroups if self.sandbox else None
        if tenant is None or tenant.cpu_seconds_per_call is None or cgroups is None:
            return None
        start, budget = cgroups.cpu_seconds(), tenant.cpu_seconds_per_call
        if start is None:
            return None

        def watch() -> None:
            used = (cgroups.cpu_seconds() or 0.0) - start
            if used > budget:
                pid = self.pid
                self.kill(f"{what} used {used:.1f} CPU-seconds, over its {budget:g} s budget")
                raise HostDeadError(label, what, f"used more than {budget:g} CPU-seconds in one call (see "
                                    f"cpu_seconds_per_call); its host (pid {pid}) was killed and restarts on the "
                                    f"next call")
        return watch

    def check_process(self, what: str, label: str) -> None:
        """``HostDeadError`` when the host process has exited (it is reaped, and the reason logged)."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            how += self.death_cause(code)
            pid = self.proc.pid
            self.kill(how)
            raise HostDeadError(label, what, f"failed: its host (pid {pid}) {how}")

    def death_cause(self, code: int) -> str:
        """What a sandboxed host's death most likely means (the sandbox turns escapes into these)."""
        if self.sandbox is None:
            return ""
        cgroups = self.sandbox.cgroups
        if code == -signal.SIGKILL and cgroups is not None and cgroups.oom_kills() > self.oom_kills:
            self.oom_kills = cgroups.oom_kills()
            return f" (over its memory limit of {self.sandbox.tenant.memory_mb} MiB: the cgroup's OOM killer)"
        if code == -signal.SIGXCPU:
            return " (its lifetime CPU limit, cpu_seconds_total)"
        if code in (-signal.SIGSEGV, -signal.SIGBUS):
            return " (a memory fault, e.g. writing to a read-only input tensor)"
        if code == 70:
            return " (its sandbox could not be built; the launcher printed why)"
        return ""

    def kill(self, reason: str) -> None:
        """SIGKILL the host's whole session now and forget its sockets (segments stay for the next host)."""
        if self.proc is None:
            return
        pid = self.proc.pid
        self.signal_group(signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        self.channel.close()
        self.deaths += 1
        self.dead_at = time.monotonic()
        self.events("host_dead", {"host": self.spec.label, "plugin": ",".join(self.spec.names), "pid": pid,
                                  "reason": reason})

    def signal_group(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def shutdown(self) -> None:
        """Ask the host to leave, then SIGTERM, then SIGKILL, logging each escalation; free every segment."""
        self.closed = True
        if self.proc is not None:
            proc, pid, wait_s = self.proc, self.proc.pid, self.settings.shutdown_timeout_s
            self.channel.order(m.ShutdownRequest("the run is over"))  # a host that cannot take it is escalated
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    self.signal_group(sig)  # first, so that a failing event sink cannot leave the host alive
                    self.events("host_shutdown", {"host": self.spec.label, "pid": pid,
                                                  "escalation": sig.name, "after_s": wait_s})
            proc.wait()
            self.signal_group(signal.SIGKILL)  # anything the plugin started in the host's session
            self.proc = None
            self.channel.close()
        self.tensors.close()
        if self.sandbox is not None:
            self.sandbox.close()
