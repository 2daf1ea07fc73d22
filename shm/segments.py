"""Kernel-owned shared segments (memfd) and the arenas that reuse them call after call.

A segment is an anonymous ``memfd``: it has no name under ``/dev/shm``, so nothing is left behind when the
kernel or a host dies — the memory goes away with the last mapping. The kernel maps it read-write; a host
gets a file descriptor over a Unix socket:

* input segments are sealed with ``F_SEAL_FUTURE_WRITE`` after the kernel mapped them and are handed out
  read-only: no process can map them writable again, so a host cannot change what the kernel sent;
* output segments are handed out read-write (the host writes its results there); both kinds are sealed
  against shrinking, so a host cannot truncate a segment under the kernel's mapping (that would SIGBUS).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from swiftk.shm.refs import ALIGN, BadReference, TensorRef, aligned, dtype_name

F_SEAL_FUTURE_WRITE = 0x0010  # Linux 5.1; not exported by Python's fcntl
MIN_SEGMENT = 1 << 20
KEEP_BYTES = 1 << 20  # a tensor sent again that is at least this large is kept in a segment of its own
SAMPLES = 16  # elements compared to tell whether a kept tensor changed behind its version counter


class Segment:
    """One memfd of ``size`` bytes, mapped read-write here."""

    def __init__(self, segment_id: int, size: int, host_writable: bool) -> None:
        self.id, self.size, self.host_writable = segment_id, size, host_writable
        kind = "out" if host_writable else "in"
        self.fd = os.memfd_create(f"swiftk-{kind}-{segment_id}", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | (0 if host_writable else F_SEAL_FUTURE_WRITE)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, seals)
        except BaseException:
            os.close(self.fd)
            raise
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)  # [size], shares the mapping

    def host_fd(self) -> int:
        """A new descriptor for the host: read-only for input segments. The caller closes it after sending."""
        flags = (os.O_RDWR if self.host_writable else os.O_RDONLY) | os.O_CLOEXEC
        return os.open(f"/proc/self/fd/{self.fd}", flags)

    def view(self, ref: TensorRef) -> torch.Tensor:
        ref.check_within(self.size)
        if ref.numel == 0:
            return torch.empty(ref.shape, dtype=ref.torch_dtype)
        return self.bytes[ref.offset:ref.offset + ref.nbytes].view(ref.torch_dtype).view(ref.shape)

    def close(self) -> None:
        del self.bytes
        try:
            self.map.close()
        except BufferError:  # a tensor still views it; the mapping goes when that tensor does
            pass
        os.close(self.fd)


class Arena:
    """Bump allocation over a list of segments, reset before each call: after the first calls have grown it to
    the working size, a call allocates nothing. ``announce`` is told about each new segment (to send its fd).
    """

    def __init__(self, host_writable: bool, announce: Callable[[Segment], None], first_id: int = 0,
                 initial_size: int = MIN_SEGMENT) -> None:
        self.host_writable = host_writable
        self.announce = announce
        self.segments: list[Segment] = []
        self.next_id = first_id
        self.initial_size = initial_size
        self.current = 0  # index of the segment being filled
        self.cursor = 0  # next free byte in it

    def reset(self) -> None:
        self.current, self.cursor = 0, 0

    @property
    def capacity(self) -> int:
        return sum(s.size for s in self.segments)

    def reserve(self, nbytes: int) -> None:
        """Make sure one call can place ``nbytes`` in a single segment (sizes the output arena up front)."""
        if not any(s.size >= nbytes for s in self.segments):
            self._grow(nbytes)

    def alloc(self, nbytes: int) -> tuple[Segment, int]:
        nbytes = aligned(max(nbytes, 1))
        while self.current < len(self.segments):
            segment = self.segments[self.current]
            if self.cursor + nbytes <= segment.size:
                offset, self.cursor = self.cursor, self.cursor + nbytes
                return segment, offset
            self.current, self.cursor = self.current + 1, 0
        segment = self._grow(nbytes)
        self.current, self.cursor = len(self.segments) - 1, nbytes
        return segment, 0

    def _grow(self, nbytes: int) -> Segment:
        last = self.segments[-1].size if self.segments else self.initial_size // 2
        size = max(2 * last, aligned(nbytes), self.initial_size)
        size = (size + MIN_SEGMENT - 1) // MIN_SEGMENT * MIN_SEGMENT
        segment = Segment(self.next_id, size, self.host_writable)
        self.next_id += 1
        self.segments.append(segment)
        self.announce(segment)
        return segment

    def put(self, tensor: torch.Tensor, requires_grad: bool = False) -> TensorRef:
        """Copy ``tensor`` (any device) into the arena; the one copy on the way to the host."""
        name = dtype_name(tensor.dtype)
        segment, offset = self.alloc(tensor.numel() * tensor.element_size())
        ref = TensorRef(segment.id, offset, name, tuple(tensor.shape), requires_grad)
        if tensor.numel():
            segment.view(ref).copy_(tensor.detach())
        return ref

    def view(self, ref: TensorRef) -> torch.Tensor:
        """The tensor ``ref`` describes, without copying; ``BadReference`` when it is not inside this arena."""
        for segment in self.segments:
            if segment.id == ref.segment:
                return segment.view(ref)
        raise BadReference(f"tensor names segment {ref.segment}, which this arena does not own")

    def close(self) -> None:
        for segment in self.segments:
            segment.close()
        self.segments.clear()


Stamp = tuple[int, int, tuple[float, ...]]


@dataclass
class _Kept:
    tensor: weakref.ref[torch.Tensor]
    segment: Segment
    ref: TensorRef  # without requires_grad, which each call sets
    stamp: Stamp | None = None  # the tensor's when it was last copied in


class KeptArena:
    """Input segments that outlive a call, one per large tensor sent again and again (the LM head's weight, sent
    to a loss in a host at every micro-batch): a tensor is kept from the second call that sends the same tensor
    object (the first goes the per-call way: a fresh tensor each call, logits or hidden states, is never kept),
    copied in then, and again only when it changed. It changed when its version counter moved (every in-place
    op, an optimizer step) or, since a write through ``.data`` does not move it, when any of ``SAMPLES`` elements
    spread over it differs. The segment of a tensor that is gone is reused for the next one that fits.
    """

    def __init__(self, announce: Callable[[Segment], None], first_id: int) -> None:
        self.announce = announce
        self.segments: list[Segment] = []
        self.next_id = first_id
        self.entries: dict[int, _Kept] = {}  # id(tensor) -> its slot
        self.seen: dict[int, weakref.ref[torch.Tensor]] = {}  # tensors sent once, not kept yet
        self.free: list[Segment] = []
        self.copies = 0  # tensors copied in (a test and the bench read it)

    @staticmethod
    def wanted(tensor: torch.Tensor) -> bool:
        """A tensor that may be kept: a contiguous CPU leaf (a parameter, a cached cast of one, not a result that
        autograd made) of at least ``KEEP_BYTES``."""
        return (tensor.is_leaf and tensor.device.type == "cpu" and tensor.is_contiguous()
                and tensor.numel() * tensor.element_size() >= KEEP_BYTES)

    def put(self, tensor: torch.Tensor, requires_grad: bool = False) -> TensorRef | None:
        """The kept copy of ``tensor``, or None the first time it is sent (the caller copies it for this call)."""
        entry = self.entries.get(id(tensor))
        if entry is None or entry.tensor() is not tensor or entry.ref.shape != tuple(tensor.shape) \
                or entry.ref.dtype != dtype_name(tensor.dtype):
            sighting = self.seen.get(id(tensor))
            if sighting is None or sighting() is not tensor:
                key = id(tensor)
                self.seen[key] = weakref.ref(tensor, lambda _: self._forget(key))
                return None
            del self.seen[id(tensor)]
            entry = self._slot(tensor)
        stamp = _stamp(tensor)
        if entry.stamp != stamp:
            self.segment_view(entry).copy_(tensor.detach())
            entry.stamp = stamp
            self.copies += 1
        ref = entry.ref
        return TensorRef(ref.segment, ref.offset, ref.dtype, ref.shape, requires_grad)

    @staticmethod
    def segment_view(entry: _Kept) -> torch.Tensor:
        return entry.segment.view(entry.ref)

    def _slot(self, tensor: torch.Tensor) -> _Kept:
        nbytes = tensor.numel() * tensor.element_size()
        fits = sorted((s for s in self.free if s.size >= nbytes), key=lambda s: s.size)
        if fits:
            segment = fits[0]
            self.free.remove(segment)
        else:
            size = (aligned(nbytes) + MIN_SEGMENT - 1) // MIN_SEGMENT * MIN_SEGMENT
            segment = Segment(self.next_id, size, host_writable=False)
            self.next_id += 1
            self.segments.append(segment)
            self.announce(segment)
        key = id(tensor)
        entry = _Kept(weakref.ref(tensor, lambda _: self._release(key)), segment,
                      TensorRef(segment.id, 0, dtype_name(tensor.dtype), tuple(tensor.shape)))
        old = self.entries.get(key)
        if old is not None:  # the same id for another tensor, or this one reshaped: its old slot is free
            self.free.append(old.segment)
        self.entries[key] = entry
        return entry

    def _forget(self, key: int) -> None:
        sighting = self.seen.get(key)
        if sighting is not None and sighting() is None:
            del self.seen[key]

    def _release(self, key: int) -> None:
        entry = self.entries.get(key)
        if entry is not None and entry.tensor() is None:
            del self.entries[key]
            self.free.append(entry.segment)

    def close(self) -> None:
        for segment in self.segments:
            segment.close()
        self.segments.clear()
        self.entries.clear()
        self.seen.clear()
        self.free.clear()


def _stamp(tensor: torch.Tensor) -> Stamp:
    flat = tensor.detach().reshape(-1)
    picks = torch.linspace(0, flat.numel() - 1, SAMPLES, dtype=torch.float64).long()
    return tensor._version, tensor.data_ptr(), tuple(flat[picks].tolist())


class Mapping:
    """The host's side: segments received from the kernel, mapped read-only (inputs) or read-write (outputs).

    Output tensors are bump-allocated over the writable segments, from the start again at each call.
    """

    def __init__(self) -> None:
        self.segments: dict[int, tuple[mmap.mmap, torch.Tensor, bool]] = {}
        self.out_order: list[int] = []
        self.out_current = 0
        self.out_cursor = 0

    def attach(self, segment_id: int, fd: int, size: int, writable: bool) -> None:
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
        finally:
            os.close(fd)
        with warnings.catch_warnings():  # a read-only mapping; torch warns that its tensor is not writable
            warnings.simplefilter("ignore", UserWarning)
            data = torch.frombuffer(mapped, dtype=torch.uint8)
        self.segments[segment_id] = (mapped, data, writable)
        if writable:
            self.out_order.append(segment_id)

    def __contains__(self, segment_id: int) -> bool:
        return segment_id in self.segments

    def view(self, ref: TensorRef) -> torch.Tensor:
        if ref.segment not in self.segments:
            raise BadReference(f"tensor names segment {ref.segment}, which this host was never given")
        _, data, _ = self.segments[ref.segment]
        ref.check_within(data.numel())
        if ref.numel == 0:
            return torch.empty(ref.shape, dtype=ref.torch_dtype)
        return data[ref.offset:ref.offset + ref.nbytes].view(ref.torch_dtype).view(ref.shape)

    def reset_outputs(self) -> None:
        self.out_current, self.out_cursor = 0, 0

    def make_room(self, nbytes: int) -> None:
        """Raise ``OutputFull`` unless one output segment can hold ``nbytes`` (all of a call's results)."""
        sizes = [self.segments[i][1].numel() for i in self.out_order]
        if aligned(nbytes) + 16 * ALIGN > max(sizes, default=0):
            raise OutputFull(aligned(nbytes) + 16 * ALIGN)

    def put(self, tensor: torch.Tensor) -> TensorRef:
        """Write a result into the kernel's output segments; ``OutputFull`` says how many bytes were missing."""
        name = dtype_name(tensor.dtype)
        nbytes = aligned(max(tensor.numel() * tensor.element_size(), 1))
        while self.out_current < len(self.out_order):
            segment_id = self.out_order[self.out_current]
            size = self.segments[segment_id][1].numel()
            if self.out_cursor + nbytes <= size:
                ref = TensorRef(segment_id, self.out_cursor, name, tuple(tensor.shape))
                self.out_cursor += nbytes
                if tensor.numel():
                    self.view(ref).copy_(tensor.detach())
                return ref
            self.out_current, self.out_cursor = self.out_current + 1, 0
        raise OutputFull(nbytes)


class OutputFull(Exception):
    """The kernel's output slots on ``device`` (-1: the CPU segments, else a CUDA index) cannot hold ``needed``
    bytes; the kernel grows them and calls again."""

    def __init__(self, needed: int, device: int = -1) -> None:
        self.needed, self.device = needed, device
        super().__init__(f"result of {needed} bytes does not fit the output slots (device {device})")
