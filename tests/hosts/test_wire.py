"""Frames over a session's SOCK_SEQPACKET socket: whole frames in order, fds with their frame, and what a broken
peer looks like."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from swiftk.hosts import wire
from swiftk.hosts.messages import MAX_FRAME


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.setblocking(False)
    return a, b


def send_all(sock: socket.socket, frame: bytes, fds: list[int] | None = None) -> None:
    for packet in wire.packets(frame):
        while not wire.try_send(sock, packet, fds):
            assert wire.wait(sock, 5.0, writable=True), "the reader stopped taking packets"
        fds = None


def read_one(reader: wire.Reader) -> tuple[bytes, list[int]]:
    while (got := reader.read()) is None:
        assert wire.wait(reader.sock, 5.0), "no frame came"
    return got


def test_frames_larger_than_the_socket_buffer_arrive_whole_and_in_order() -> None:
    """A 3 MiB frame is 48 packets, more than the socket holds at once: it goes while the reader reads."""
    a, b = pair()
    frames = [b"", b"small", os.urandom(3 << 20), bytes(wire.CHUNK), bytes(wire.CHUNK + 1), b"end"]
    sender = threading.Thread(target=lambda: [send_all(a, f) for f in frames])
    sender.start()
    reader = wire.Reader(b)
    got = [read_one(reader)[0] for _ in frames]
    sender.join()
    assert got == frames
    assert reader.read() is None, "nothing left over"


def test_fds_travel_with_their_frame() -> None:
    a, b = pair()
    r, w = os.pipe()
    try:
        send_all(a, b"first")
        send_all(a, b"with a pipe" * 10_000, [r])  # several packets; the fd rides on the first
        reader = wire.Reader(b)
        assert read_one(reader) == (b"first", [])
        frame, fds = read_one(reader)
        assert frame == b"with a pipe" * 10_000 and len(fds) == 1
        os.write(w, b"x")
        assert os.read(fds[0], 1) == b"x", "the received fd is the same pipe"
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)


def test_a_packet_without_its_lead_byte_or_a_frame_without_end_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair()
    a.send(b"\x93garbage")
    with pytest.raises(wire.BadPacket, match="not part of a frame"):
        read_one(wire.Reader(b))
    monkeypatch.setattr(wire, "MAX_FRAME", 4000)  # the real limit, 64 MiB, in miniature
    for _ in range(5):
        a.send(wire.MORE + bytes(1000))  # a frame that never ends
    with pytest.raises(wire.BadPacket, match="over the 4000-byte limit"):
        read_one(wire.Reader(b))
    assert MAX_FRAME == 64 << 20


def test_a_closed_peer_is_seen_by_the_reader_and_the_sender() -> None:
    a, b = pair()
    send_all(a, b"last words")
    a.close()
    reader = wire.Reader(b)
    assert read_one(reader)[0] == b"last words", "what was sent before the close is still read"
    with pytest.raises(wire.PeerGone):
        read_one(reader)
    with pytest.raises(wire.PeerGone):
        wire.try_send(b, wire.LAST + b"anyone?")
