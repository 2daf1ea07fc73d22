"""The kernel's end of one host session: three zmq ``ipc://`` sockets the kernel binds and the host connects to
(calls: PAIR; heartbeats: PULL, conflated, only the newest matters; orders: PUSH) and the Unix socket that
carries shared-segment descriptors and their fds.

Every send and receive has a deadline and watches the host while it waits (its process, its heartbeats), so a
host that died, hangs or stopped reading costs the call a ``HostDeadError``, never a hang: a PAIR socket whose
peer is gone blocks a plain send forever.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from swiftk.contracts.errors import HostDeadError
from swiftk.hosts import messages as m
from swiftk.hosts.settings import HostSettings
from swiftk.shm.segments import Segment


class Watched(Protocol):
    """What a channel needs of the process behind it: its pid (for messages), whether it still runs
    (``HostDeadError`` when not), and a way to kill it (which closes the channel)."""

    @property
    def pid(self) -> int | None: ...

    def check_process(self, what: str, label: str) -> None: ...

    def kill(self, reason: str) -> None: ...


class Channel:
    """One session's sockets, bound at ``endpoint("call" | "hb" | "ctl")``; ``own`` hands each socket file to
    a sandboxed host's uid. ``fds`` (the segment channel) is set by whoever connects it."""

    fds: socket.socket

    def __init__(self, context: zmq.Context[Any], settings: HostSettings, label: str, host: Watched,
                 endpoint: Callable[[str], str], own: Callable[[str], None] | None = None) -> None:
        self.settings, self.label, self.host = settings, label, host
        self.calls = context.socket(zmq.PAIR)
        self.beats = context.socket(zmq.PULL)
        self.beats.setsockopt(zmq.CONFLATE, 1)
        self.orders = context.socket(zmq.PUSH)
        for sock, suffix in ((self.calls, "call"), (self.beats, "hb"), (self.orders, "ctl")):
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(endpoint(suffix))
            if own is not None:
                own(endpoint(suffix))
        self.last_beat = time.monotonic()

    def send(self, frame: bytes, timeout_s: float, what: str, label: str | None = None, deadline: bool = False,
             starting: bool = False) -> None:
        """Queue ``frame`` for the host, watching its process and heartbeats while it cannot be queued: a PAIR
        socket whose peer is gone blocks a plain send forever (a host that died between two calls)."""
        label = label or self.label
        end = time.monotonic() + timeout_s
        while True:
            try:
                self.calls.send(frame, zmq.NOBLOCK)
                return
            except zmq.Again:  # no peer (it left, or has not connected yet), or its queue is full
                pass
            if self.calls.poll(max(1, int(min(end - time.monotonic(), self.settings.heartbeat_interval_s) * 1000)),
                               zmq.POLLOUT):
                continue
            self.check_alive(what, label, starting)
            self.check_deadline(end, timeout_s, what, label, deadline, "take the request")

    def receive(self, timeout_s: float, what: str, label: str | None = None, deadline: bool = False,
                starting: bool = False, watch: Callable[[], None] | None = None) -> m.Message:
        """The host's next message, watching its process, heartbeats, the deadline and (``watch``, called while
        waiting) anything else the caller bounds, such as a CPU budget."""
        label = label or self.label
        end = time.monotonic() + timeout_s
        while True:
            remaining = end - time.monotonic()
            if self.calls.poll(max(1, int(min(remaining, self.settings.heartbeat_interval_s) * 1000))):
                frame = self.calls.recv()
                try:
                    return m.decode(frame)
                except m.ProtocolError as exc:
                    self.host.kill(f"sent a malformed message: {exc}")
                    raise HostDeadError(label, what, f"(host pid {self.host.pid}) sent a malformed message "
                                        f"({exc}); the host was killed") from None
            self.check_alive(what, label, starting)
            if watch is not None:
                watch()
            self.check_deadline(end, timeout_s, what, label, deadline, "answer")

    def check_deadline(self, end: float, timeout_s: float, what: str, label: str, deadline: bool, doing: str) -> None:
        """Past ``end``, the host is killed and ``what`` fails: it did not ``doing`` within ``timeout_s``."""
        if time.monotonic() < end:
            return
        pid = self.host.pid
        key = "deadline_s" if deadline else "[hosts] start_timeout_s"
        self.host.kill(f"{what} missed its {timeout_s:g} s deadline (did not {doing})")
        raise HostDeadError(label, what, f"did not {doing} within {timeout_s:g} s (see {key}); its host (pid {pid}) "
                            f"was killed and restarts on the next call")

    def check_alive(self, what: str, label: str | None = None, starting: bool = False) -> None:
        """``HostDeadError`` when the process is gone or (once started) silent past ``heartbeat_timeout_s``."""
        label = label or self.label
        self.host.check_process(what, label)
        while self.beats.poll(0):
            try:
                beat = m.decode(self.beats.recv())
            except m.ProtocolError:
                continue
            if isinstance(beat, m.HeartbeatEvent):
                self.last_beat = time.monotonic()
        silent = time.monotonic() - self.last_beat
        if not starting and silent > self.settings.heartbeat_timeout_s:
            pid = self.host.pid
            self.host.kill(f"missed heartbeats for {silent:.1f} s")
            raise HostDeadError(label, what, f"failed: its host (pid {pid}) missed heartbeats for {silent:.1f} s; see "
                                f"[hosts] heartbeat_timeout_s")

    def send_segment(self, segment: Segment, what: str, label: str) -> None:
        """One segment's descriptor and fd over the Unix channel: a host that is gone (a broken pipe) or stuck (a
        full channel) is a ``HostDeadError``, never an ``OSError`` that ends the run or a send that never returns."""
        fd = segment.host_fd()
        try:
            event = m.encode(m.SegmentEvent(segment.id, segment.size, segment.host_writable))
            self.fds.settimeout(self.settings.heartbeat_timeout_s)
            socket.send_fds(self.fds, [event], [fd])
        except OSError as exc:  # TimeoutError included
            self.host.check_process(what, label)  # a death explains itself
            pid = self.host.pid
            self.host.kill(f"its segment channel failed: {exc!r}")
            raise HostDeadError(label, what, f"failed: its host (pid {pid}) did not take a shared segment "
                                f"({exc!r}); the host was killed and restarts on the next call") from None
        finally:
            os.close(fd)

    def order(self, message: m.Message) -> None:
        """Send an order (``ShutdownRequest``) without waiting: a host that cannot take it is escalated by the
        caller."""
        try:
            self.orders.send(m.encode(message), zmq.NOBLOCK)
        except zmq.ZMQError:  # no peer to take it (the host is gone or never connected)
            pass

    def close(self) -> None:
        for sock in (self.calls, self.beats, self.orders):
            sock.close(linger=0)
        self.fds.close()
