"""CUDA tensors between processes on one node: IPC handles to kernel-owned staging buffers.

The kernel copies a CUDA tensor into a staging buffer it owns (so a host that writes to its input changes a
copy, never the kernel's tensor) and sends ``CudaRef(buffer, offset, dtype, shape)``. Each buffer's IPC handle
is sent once, when the buffer is created; the host opens it once and caches the storage. The producer (the
kernel) keeps every buffer alive for the host's whole life. Results come back the same way, in output
buffers the kernel allocated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from swiftk.shm.refs import BadReference, CudaRef, aligned, dtype_name

MIN_BUFFER = 1 << 24


def share_handle(buffer: torch.Tensor) -> list[Any]:
    """The IPC handle of ``buffer``'s storage, as msgpack-able values (see ``open_handle``)."""
    (device, handle, size, offset, ref_handle, ref_offset, event_handle,
     event_sync) = buffer.untyped_storage()._share_cuda_()  # type: ignore[no-untyped-call]
    return [int(device), bytes(handle), int(size), int(offset), bytes(ref_handle), int(ref_offset),
            bytes(event_handle) if event_handle else b"", bool(event_sync)]


def open_handle(handle: list[Any]) -> torch.Tensor:
    """Open a buffer another process shared; the memory stays valid while the producer keeps it."""
    device, raw, size, offset, ref_handle, ref_offset, event_handle, event_sync = handle
    torch.cuda._lazy_init()  # type: ignore[no-untyped-call]
    storage = torch.UntypedStorage._new_shared_cuda(
        device, raw, size, offset, ref_handle, ref_offset, event_handle or None, event_sync)
    return torch.empty(0, dtype=torch.uint8, device=f"cuda:{device}").set_(storage)


def view(buffer: torch.Tensor, ref: CudaRef) -> torch.Tensor:
    ref.as_tensor_ref().check_within(buffer.numel())
    nbytes = ref.as_tensor_ref().nbytes
    if nbytes == 0:
        return torch.empty(ref.shape, dtype=ref.as_tensor_ref().torch_dtype, device=buffer.device)
    return buffer[ref.offset:ref.offset + nbytes].view(ref.as_tensor_ref().torch_dtype).view(ref.shape)


class CudaArena:
    """The CUDA counterpart of ``segments.Arena``: staging buffers on one device, bump-allocated per call."""

    def __init__(self, device: torch.device, announce: Callable[[int, list[Any]], None], first_id: int) -> None:
        self.device = device
        self.announce = announce
        self.buffers: list[tuple[int, torch.Tensor]] = []
        self.next_id = first_id
        self.current, self.cursor = 0, 0

    def reset(self) -> None:
        self.current, self.cursor = 0, 0

    def reserve(self, nbytes: int) -> None:
        if not any(b.numel() >= nbytes for _, b in self.buffers):
            self._grow(nbytes)

    def _grow(self, nbytes: int) -> tuple[int, torch.Tensor]:
        last = self.buffers[-1][1].numel() if self.buffers else MIN_BUFFER // 2
        buffer = torch.empty(max(2 * last, aligned(nbytes), MIN_BUFFER), dtype=torch.uint8, device=self.device)
        entry = (self.next_id, buffer)
        self.next_id += 1
        self.buffers.append(entry)
        self.announce(entry[0], share_handle(buffer))
        return entry

    def put(self, tensor: torch.Tensor, requires_grad: bool = False) -> CudaRef:
        name = dtype_name(tensor.dtype)
        nbytes = aligned(max(tensor.numel() * tensor.element_size(), 1))
        while self.current < len(self.buffers) and self.cursor + nbytes > self.buffers[self.current][1].numel():
            self.current, self.cursor = self.current + 1, 0
        if self.current == len(self.buffers):
            self._grow(nbytes)
        buffer_id, buffer = self.buffers[self.current]
        ref = CudaRef(buffer_id, self.cursor, name, tuple(tensor.shape), requires_grad)
        self.cursor += nbytes
        if tensor.numel():
            view(buffer, ref).copy_(tensor.detach())
        return ref

    def view(self, ref: CudaRef) -> torch.Tensor:
        for buffer_id, buffer in self.buffers:
            if buffer_id == ref.buffer:
                return view(buffer, ref)
        raise BadReference(f"CUDA tensor names buffer {ref.buffer}, which this arena does not own")

    def close(self) -> None:
        self.buffers.clear()


class CudaMapping:
    """The host's side: opened buffers by id (each opened once)."""

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}
        self.out_order: list[int] = []
        self.out_current, self.out_cursor = 0, 0

    def attach(self, buffer_id: int, handle: list[Any], writable: bool) -> None:
        if buffer_id not in self.buffers:
            self.buffers[buffer_id] = open_handle(handle)
            if writable:
                self.out_order.append(buffer_id)

    def reset_outputs(self) -> None:
        self.out_current, self.out_cursor = 0, 0

    def put(self, tensor: torch.Tensor) -> CudaRef:
        """Write a CUDA result into the kernel's output buffers (``OutputFull`` when they are too small)."""
        from swiftk.shm.segments import OutputFull

        name = dtype_name(tensor.dtype)
        nbytes = aligned(max(tensor.numel() * tensor.element_size(), 1))
        while self.out_current < len(self.out_order):
            buffer_id = self.out_order[self.out_current]
            if self.out_cursor + nbytes <= self.buffers[buffer_id].numel():
                ref = CudaRef(buffer_id, self.out_cursor, name, tuple(tensor.shape))
                self.out_cursor += nbytes
                if tensor.numel():
                    self.view(ref).copy_(tensor.detach())
                return ref
            self.out_current, self.out_cursor = self.out_current + 1, 0
        raise OutputFull(nbytes, tensor.device.index or 0)

    def view(self, ref: CudaRef) -> torch.Tensor:
        if ref.buffer not in self.buffers:
            raise BadReference(f"CUDA tensor names buffer {ref.buffer}, which this host was never given")
        return view(self.buffers[ref.buffer], ref)
