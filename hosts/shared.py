"""A host shared by the ranks of a node (``shared = "node"``): the node's first rank starts it as a plain
``Host``; every other rank holds a ``GuestHost``, one more session of that process on endpoints of its own."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import zmq

from swiftk.contracts.errors import HostDeadError
from swiftk.hosts import messages as m
from swiftk.hosts.process import SHARED_DEAD, EventSink, HostSpec, console
from swiftk.hosts.settings import HostSettings
from swiftk.hosts.supervisor import Host, HostStartError


class GuestHost(Host):
    """A rank's session with the host its node's first rank started (``shared = "node"``): the same calls,
    segments and supervision, but no process of its own. The host connects to this rank's endpoints; a death
    is seen through the host's pid and heartbeats, and the host is not restarted (``SHARED_DEAD``)."""

    def __init__(self, spec: HostSpec, settings: HostSettings, context: zmq.Context[Any],
                 events: EventSink = console) -> None:
        super().__init__(spec, settings, context, events)
        assert spec.shared is not None
        self.shared = spec.shared
        self.host_pid: int | None = None
        self.gone = False

    @property
    def pid(self) -> int | None:
        return self.host_pid

    def spawn(self) -> None:
        rank = self.shared.local_rank
        self.channel = self.bind(lambda suffix: self.shared.endpoint(rank, suffix))
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind("\0" + self.shared.channel(rank))
        self.listener.listen(1)
        self.channel.connect(self.listener)  # until the host connects its socket
        self.token = self.shared.fetch(self.shared.token_key, self.settings.start_timeout_s)
        self.channel.last_beat = time.monotonic()

    def handshake(self, same_code: bool = True) -> m.HelloReply:
        self.listener.settimeout(self.settings.start_timeout_s)
        try:
            link, _ = self.listener.accept()
            self.channel.connect(link)
        except TimeoutError:
            raise HostStartError(f"the shared host '{self.spec.label}' of this node did not connect within "
                                 f"{self.settings.start_timeout_s:g} s (local rank 0 starts it)") from None
        finally:
            self.listener.close()
        reply = super().handshake(same_code)
        self.host_pid = reply.pid
        return reply

    def ensure_running(self, what: str) -> None:
        if self.closed:
            raise HostDeadError(self.spec.label, what, "is shut down")
        if self.gone:
            raise HostDeadError(self.spec.label, what, SHARED_DEAD)

    def check_process(self, what: str, label: str) -> None:
        if self.host_pid is None:
            return
        try:
            state = Path(f"/proc/{self.host_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            state = "gone"
        if state in ("Z", "X", "gone"):
            pid = self.host_pid
            self.kill("exited")
            raise HostDeadError(label, what, f"failed: its shared host (pid {pid}, started by local rank 0) exited")

    def kill(self, reason: str) -> None:
        """Kill the shared host (a hung host hangs every rank of the node) and leave it for good."""
        if self.gone:
            return
        pid, self.gone, self.host_pid = self.host_pid, True, None
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.channel.close()
        self.deaths += 1
        self.dead_at = time.monotonic()
        self.events("host_dead", {"host": self.spec.label, "plugin": ",".join(self.spec.names), "pid": pid,
                                  "reason": reason})

    def shutdown(self) -> None:
        """Tell the host this rank is done (it leaves when every rank is); free this rank's segments."""
        self.closed = True
        if not self.gone:
            self.channel.order(m.ShutdownRequest("this rank is done"))
            self.channel.close()
        self.tensors.close()
