"""Frames over a session's Unix ``SOCK_SEQPACKET`` socket: the kernel's requests, the host's replies, and the
shared-segment descriptors (each with its fd) that come before the request that uses them, in one ordered stream.

A frame is sent as one or more packets of at most ``CHUNK`` bytes, each led by one byte: ``MORE`` when the frame
goes on in the next packet, ``LAST`` on its final one. A packet is delivered whole or not at all, so a reader
never sees half a packet; fds travel with a frame's first packet.

Why not zmq: a zmq round trip crosses each side's I/O thread (four thread hand-offs), 70-230 us on a 2-core
machine, where a packet on a Unix socket wakes the reader directly (20-40 us, bench/host_overhead.py).
"""

from __future__ import annotations

import array
import contextlib
import errno
import select
import socket
from collections.abc import Iterator

from swiftk.hosts.messages import MAX_FRAME

CHUNK = 64 << 10  # under the socket's default send buffer (208 KiB), which bounds a packet
MORE, LAST = b"\x01", b"\x00"
FD_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)  # up to 4 fds with one packet
GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)  # the peer closed its end


class PeerGone(Exception):
    """The other side closed the socket (it exited, or was killed)."""


class BadPacket(Exception):
    """A packet that is not part of a well-formed frame (no lead byte, or cut short)."""


def closed(exc: OSError) -> Exception:
    """What a socket error means: ``PeerGone`` when the peer closed its end, else the error itself."""
    return PeerGone(str(exc)) if exc.errno in GONE else exc


def packets(frame: bytes) -> Iterator[bytes]:
    """``frame`` as the packets that carry it (one when it fits in ``CHUNK``)."""
    view = memoryview(frame)
    for start in range(0, max(len(frame), 1), CHUNK):
        last = start + CHUNK >= len(frame)
        yield (LAST if last else MORE) + view[start : start + CHUNK]


def try_send(sock: socket.socket, packet: bytes, fds: list[int] | None = None) -> bool:
    """Send one packet now: True if it went, False if the socket's buffer is full; ``PeerGone`` if no one reads."""
    try:
        # sendmsg itself: socket.send_fds drops its flags before Python 3.12, and would block
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sock.sendmsg([packet], rights, socket.MSG_DONTWAIT)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        raise closed(exc) from None


def wait(sock: socket.socket, timeout_s: float, writable: bool = False) -> bool:
    """Whether ``sock`` became readable (or ``writable``) within ``timeout_s``; a closed peer counts as ready."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT if writable else select.POLLIN)
    return bool(poller.poll(max(0, int(timeout_s * 1000))))


def received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


class Reader:
    """Reassembles frames from one socket's packets, without blocking."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parts: list[bytes] = []
        self.size = 0
        self.fds: list[int] = []

    def read(self) -> tuple[bytes, list[int]] | None:
        """The next whole frame and the fds that came with it; None when none is complete yet. ``PeerGone`` when
        the peer closed its end, ``BadPacket`` for a packet without its lead byte or cut short."""
        while True:
            try:
                data, ancillary, flags, _ = self.sock.recvmsg(CHUNK + 1, FD_SPACE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            except OSError as exc:
                raise closed(exc) from None
            fds = received_fds(ancillary)
            if not data and not fds:
                raise PeerGone("end of stream")
            self.fds += fds
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or data[:1] not in (MORE, LAST):
                self.drop()
                raise BadPacket(f"a packet of {len(data)} bytes that is not part of a frame")
            self.parts.append(data[1:])
            self.size += len(data) - 1
            if self.size > MAX_FRAME:  # a peer that never ends its frame does not get to fill this process
                self.drop()
                raise BadPacket(f"a frame over the {MAX_FRAME}-byte limit")
            if data[:1] == LAST:
                frame, fds = b"".join(self.parts), self.fds
                self.parts, self.size, self.fds = [], 0, []
                return frame, fds

    def drop(self) -> None:
        """Forget a partial frame, closing the fds it brought."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                socket.close(fd)
        self.parts, self.size, self.fds = [], 0, []
