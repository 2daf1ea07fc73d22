"""How a host's calls carry tensors: as ``TensorRef`` / ``CudaRef`` descriptors into memory the kernel owns,
never as bytes in a message.

A large tensor sent call after call (the LM head a loss in a host gets at every micro-batch) has a segment of its
own from its second call on, which outlives the call (``KeptArena``): it is copied in then and again only when it
changed.

Arguments are staged in input segments the host maps read-only; results (and a loss's gradients) are written
by the host into output segments the kernel sized, and copied out here. CUDA tensors cross as IPC handles of
buffers the kernel keeps alive (each handle is sent once, then cached by the host); a sandboxed host, in another
pid namespace, gets CPU copies instead. Output segments and buffers are numbered from ``OUTPUT_IDS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from swiftk.contracts.errors import PluginError
from swiftk.hosts import messages as m
from swiftk.hosts.codec import Unsendable, to_wire
from swiftk.shm.cuda import CudaArena
from swiftk.shm.refs import BadReference, CudaRef, TensorRef
from swiftk.shm.segments import Arena, KeptArena, Segment

OUTPUT_IDS = 1 << 20  # output segments and buffers are numbered from here, inputs from 0
KEPT_IDS = 1 << 19  # kept input segments from here
MAX_OUTPUT = 1 << 36  # a host asking for more output space than this is broken


class Transport:
    """One host's segments and CUDA buffers, which outlive its process (a restarted host is sent them again)."""

    def __init__(self) -> None:
        self.inputs = Arena(host_writable=False, announce=lambda s: None)
        self.outputs = Arena(host_writable=True, announce=lambda s: None, first_id=OUTPUT_IDS)
        self.kept = KeptArena(announce=lambda s: None, first_id=KEPT_IDS)
        self.cuda_inputs: dict[torch.device, CudaArena] = {}
        self.cuda_outputs: dict[torch.device, CudaArena] = {}
        self.cuda_handles: dict[int, tuple[list[Any], bool]] = {}
        self.announced: set[int] = set()  # segment ids the current host process has mapped
        self.cuda_announced: set[int] = set()  # CUDA buffer ids it has opened (another id space)

    def forget_host(self) -> None:
        """A new host process has mapped nothing yet: every segment and buffer is announced to it again."""
        self.announced.clear()
        self.cuda_announced.clear()

    def encode(self, value: Any, differentiate: bool, label: str, hook: str, cpu_only: bool = False
               ) -> tuple[Any, list[torch.Tensor], list[m.CudaBufferEvent]]:
        """``value`` on the wire, its tensors staged in the input slots; with ``differentiate``, the floating-point
        tensors that require grad (in order: the host returns one gradient each, in output slots sized here), and
        the CUDA buffers the host has not opened yet. ``cpu_only``: CUDA tensors go as CPU copies."""
        self.inputs.reset()
        for arena in self.cuda_inputs.values():
            arena.reset()
        grad_inputs: list[torch.Tensor] = []
        grad_bytes: dict[torch.device, int] = {}

        def tensor(t: torch.Tensor) -> TensorRef | Any:
            needs = differentiate and t.requires_grad and t.is_floating_point()
            if needs:
                grad_inputs.append(t)
                # Its gradient comes back where the host computes: on CPU copies for a sandboxed host, which must
                # never be sent a CUDA buffer to open (it has no GPU in its namespace).
                where = torch.device("cpu") if cpu_only else t.device
                grad_bytes[where] = grad_bytes.get(where, 0) + t.numel() * t.element_size() + 64
            if t.is_cuda and not cpu_only:
                return self.cuda_arena(self.cuda_inputs, t.device, 0).put(t, needs)
            if self.kept.wanted(t) and (kept := self.kept.put(t, needs)) is not None:
                return kept
            # A sandboxed host gets CPU copies: CUDA IPC handles cannot be opened from another pid namespace.
            return self.inputs.put(t.cpu() if t.is_cuda else t, needs)

        try:
            wire = to_wire(value, tensor, "argument")
        except Unsendable as exc:
            raise PluginError(label, hook, f"cannot run in a plugin host: {exc}") from None
        for device, nbytes in grad_bytes.items():  # the gradients come back in output slots sized up front
            if device.type == "cuda":
                self.cuda_arena(self.cuda_outputs, device, OUTPUT_IDS).reserve(nbytes + (1 << 20))
            else:
                self.outputs.reserve(nbytes + (1 << 20))
        if not self.outputs.segments:
            self.outputs.reserve(1 << 20)
        for device in {d for d in grad_bytes if d.type == "cuda"} | {a.device for a in self.cuda_inputs.values()}:
            torch.cuda.current_stream(device).synchronize()  # the copies are done before the host reads them
        events = [m.CudaBufferEvent(buffer, handle, writable) for buffer, (handle, writable)
                  in self.cuda_handles.items() if buffer not in self.cuda_announced]
        self.cuda_announced.update(e.buffer for e in events)
        return wire, grad_inputs, events

    def cuda_arena(self, arenas: dict[torch.device, CudaArena], device: torch.device, first_id: int) -> CudaArena:
        if device not in arenas:
            writable = arenas is self.cuda_outputs
            start = first_id + 1000 * (device.index or 0) + 100_000 * (1 if not writable else 0)

            def announce(buffer: int, handle: list[Any]) -> None:
                self.cuda_handles[buffer] = (handle, writable)

            arenas[device] = CudaArena(device, announce, start)
        return arenas[device]

    def tensor_out(self, ref: TensorRef | CudaRef) -> torch.Tensor:
        """A result the host wrote, copied out of its output slot (``BadReference`` for any other slot)."""
        if isinstance(ref, CudaRef):
            for arena in self.cuda_outputs.values():
                if any(buffer == ref.buffer for buffer, _ in arena.buffers):
                    return arena.view(ref).clone()
            raise BadReference(f"CUDA result names buffer {ref.buffer}, which is not an output buffer")
        if ref.segment < OUTPUT_IDS:
            raise BadReference(f"result names input segment {ref.segment}")
        return self.outputs.view(ref).clone()

    def grow(self, nbytes: int, device: int) -> None:
        """Room for ``nbytes`` of results on ``device`` (-1: CPU), which a host asked for (checked by the caller)."""
        if device < 0:
            self.outputs.reserve(nbytes)
        else:
            self.cuda_arena(self.cuda_outputs, torch.device("cuda", device), OUTPUT_IDS).reserve(nbytes)

    def sync(self, send: Callable[[Segment], None]) -> None:
        """``send`` the host every segment it has not seen (all of them after a restart), before the request."""
        for segment in (*self.inputs.segments, *self.kept.segments, *self.outputs.segments):
            if segment.id not in self.announced:
                send(segment)
                self.announced.add(segment.id)

    def close(self) -> None:
        """Free every segment and buffer."""
        self.inputs.close()
        self.kept.close()
        self.outputs.close()
        for arena in (*self.cuda_inputs.values(), *self.cuda_outputs.values()):
            arena.close()
