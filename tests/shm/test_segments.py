"""Shared segments: copies in and views out, read-only in the host, sealed, and gone after close."""

from __future__ import annotations

import mmap
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from swiftk.shm import Arena, BadReference, Mapping, TensorRef


def memfds() -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return [link for link in links if "memfd:swiftk" in link]


def test_tensors_of_every_dtype_round_trip_and_a_warm_arena_allocates_nothing() -> None:
    announced = []
    arena = Arena(host_writable=False, announce=announced.append)
    tensors = [torch.randn(3, 5), torch.randn(4, 4).to(torch.bfloat16).t(), torch.arange(7), torch.empty(0, 3),
               torch.tensor([True, False]), torch.randn(2, 2, dtype=torch.float64)]
    for _ in range(3):
        arena.reset()
        refs = [arena.put(t) for t in tensors]
        for ref, t in zip(refs, tensors, strict=True):
            assert torch.equal(arena.view(ref), t)
    assert len(announced) == 1  # one segment, allocated by the first call and reused since
    with pytest.raises(BadReference, match="runs past the end"):
        arena.view(TensorRef(refs[0].segment, arena.segments[0].size - 64, "float32", (32,)))
    arena.close()
    assert memfds() == []


def test_an_input_segment_is_read_only_sealed_and_a_host_writing_to_it_dies() -> None:
    arena = Arena(host_writable=False, announce=lambda s: None)
    sent = torch.arange(16, dtype=torch.float32)
    ref = arena.put(sent)
    segment = arena.segments[0]
    fd = segment.host_fd()
    with pytest.raises(PermissionError):  # no process can map it writable again
        reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            mmap.mmap(reopened, segment.size)
        finally:
            os.close(reopened)
    with pytest.raises(OSError):
        os.ftruncate(segment.fd, 0)  # nor shrink it under the kernel's mapping
    host = (f"from swiftk.shm import Mapping, TensorRef\nm = Mapping()\nm.attach(0, {fd}, {segment.size}, False)\n"
            f"t = m.view(TensorRef(0, {ref.offset}, 'float32', (16,)))\nassert float(t.sum()) == 120.0\n"
            f"t[0] = 99.0\n")
    child = subprocess.run([sys.executable, "-c", host], pass_fds=(fd,), capture_output=True, text=True)
    os.close(fd)
    assert child.returncode == -signal.SIGSEGV, child.stderr  # the write faulted in the host...
    assert torch.equal(arena.view(ref), sent)  # ...and the kernel's bytes are intact
    arena.close()
    assert memfds() == []


def test_an_output_segment_is_written_by_the_host_and_read_by_the_kernel() -> None:
    arena = Arena(host_writable=True, announce=lambda s: None, first_id=7)
    arena.reserve(4096)
    segment = arena.segments[0]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host = Mapping()
    host.attach(segment.id, segment.host_fd(), segment.size, True)
    ref = host.put(torch.full((3,), 2.5))
    assert torch.equal(arena.view(ref), torch.full((3,), 2.5))
    with pytest.raises(OSError):
        os.ftruncate(segment.fd, 0)
    del host
    ours.close()
    theirs.close()
    arena.close()
    assert memfds() == []
