"""The kernel's end of one host session: a Unix ``SOCK_SEQPACKET`` socket that carries requests, replies and the
shared-segment descriptors with their fds (``hosts/wire.py``), and two zmq ``ipc://`` sockets the kernel binds and
the host connects to (heartbeats: PULL, conflated, only the newest matters; orders: PUSH).

Every send and receive has a deadline and watches the host while it waits (its process, its heartbeats), so a
host that died, hangs or stopped reading costs the call a ``HostDeadError``, never a hang.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any, NoReturn, Protocol

import zmq

from swiftk.contracts.errors import HostDeadError
from swiftk.hosts import messages as m
from swiftk.hosts import wire
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
    """One session's zmq sockets, bound at ``endpoint("hb" | "ctl")`` (``own`` hands each socket file to a
    sandboxed host's uid), and its Unix socket, set by whoever connects it (``connect``)."""

    link: socket.socket

    def __init__(self, context: zmq.Context[Any], settings: HostSettings, label: str, host: Watched,
                 endpoint: Callable[[str], str], own: Callable[[str], None] | None = None) -> None:
        self.settings, self.label, self.host = settings, label, host
        self.beats = context.socket(zmq.PULL)
        self.beats.setsockopt(zmq.CONFLATE, 1)
        self.orders = context.socket(zmq.PUSH)
        for sock, suffix in ((self.beats, "hb"), (self.orders, "ctl")):
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(endpoint(suffix))
            if own is not None:
                own(endpoint(suffix))
        self.last_beat = time.monotonic()

    def connect(self, link: socket.socket) -> None:
        """The session's Unix socket (one end of a socketpair, or the connection a shared host made)."""
        self.link, self.reader = link, wire.Reader(link)

    def send(self, frame: bytes, timeout_s: float, what: str, label: str | None = None, deadline: bool = False,
             starting: bool = False) -> None:
        """Send ``frame`` to the host, watching its process and heartbeats while its socket is full (a host that
        stopped reading)."""
        label = label or self.label
        end = time.monotonic() + timeout_s
        for packet in wire.packets(frame):
            while not self.try_send(packet, what, label):
                if wire.wait(self.link, min(end - time.monotonic(), self.settings.heartbeat_interval_s), True):
                    continue
                self.check_alive(what, label, starting)
                self.check_deadline(end, timeout_s, what, label, deadline, "take the request")

    def receive(self, timeout_s: float, what: str, label: str | None = None, deadline: bool = False,
                starting: bool = False, watch: Callable[[], None] | None = None) -> m.Message:
        """The host's next message, watching its process, heartbeats, the deadline and (``watch``, called while
        waiting) anything else the caller bounds, such as a CPU budget. Reads without sleeping for
        ``answer_spin_us`` first: most answers come back within it."""
        label = label or self.label
        end = time.monotonic() + timeout_s
        spin_end = time.perf_counter() + self.settings.answer_spin_us / 1e6
        while True:
            message = self.read(what, label)
            if message is not None:
                return message
            if time.perf_counter() < spin_end:
                continue
            if wire.wait(self.link, min(end - time.monotonic(), self.settings.heartbeat_interval_s)):
                continue
            self.check_alive(what, label, starting)
            if watch is not None:
                watch()
            self.check_deadline(end, timeout_s, what, label, deadline, "answer")

    def read(self, what: str, label: str) -> m.Message | None:
        """The host's next message if it is all here, else None; a closed or garbled socket kills the host."""
        try:
            got = self.reader.read()
        except wire.PeerGone:
            self.peer_gone(what, label)
        except wire.BadPacket as exc:
            self.malformed(what, label, str(exc))
        if got is None:
            return None
        frame, fds = got
        for fd in fds:  # a host sends no descriptors
            os.close(fd)
        try:
            return m.decode(frame)
        except m.ProtocolError as exc:
            self.malformed(what, label, str(exc))

    def try_send(self, packet: bytes, what: str, label: str, fds: list[int] | None = None) -> bool:
        try:
            return wire.try_send(self.link, packet, fds)
        except wire.PeerGone:
            self.peer_gone(what, label)

    def peer_gone(self, what: str, label: str) -> NoReturn:
        """The host closed its socket: it is exiting (its exit code explains why), or it closed it itself."""
        end = time.monotonic() + 1.0  # its sockets close just before its exit is seen
        while time.monotonic() < end:
            self.host.check_process(what, label)
            time.sleep(0.01)
        pid = self.host.pid
        self.host.kill("closed its socket")
        raise HostDeadError(label, what, f"failed: its host (pid {pid}) closed its socket; the host was killed and "
                            f"restarts on the next call")

    def malformed(self, what: str, label: str, problem: str) -> NoReturn:
        pid = self.host.pid
        self.host.kill(f"sent a malformed message: {problem}")
        raise HostDeadError(label, what, f"(host pid {pid}) sent a malformed message ({problem}); the host was "
                            f"killed")

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
        """One segment's descriptor and fd, ahead of the request that uses it: a host that is gone (a closed
        socket) or stuck (a socket that stays full) is a ``HostDeadError``, never an ``OSError`` that ends the run
        or a send that never returns."""
        fd = segment.host_fd()
        try:
            packet = wire.LAST + m.encode(m.SegmentEvent(segment.id, segment.size, segment.host_writable))
            end = time.monotonic() + self.settings.heartbeat_timeout_s
            while not self.try_send(packet, what, label, [fd]):
                if time.monotonic() >= end:
                    pid = self.host.pid
                    self.host.kill("its socket stayed full")
                    raise HostDeadError(label, what, f"failed: its host (pid {pid}) did not take a shared segment "
                                        f"within {self.settings.heartbeat_timeout_s:g} s; the host was killed and "
                                        f"restarts on the next call")
                if not wire.wait(self.link, self.settings.heartbeat_interval_s, writable=True):
                    self.check_alive(what, label)
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
        for sock in (self.beats, self.orders):
            sock.close(linger=0)
        self.link.close()
