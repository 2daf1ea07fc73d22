"""Tensor transport between the kernel and plugin hosts: kernel-owned memfd segments mapped read-only in the
host, ``TensorRef`` descriptors on the wire, and CUDA IPC handles for GPU tensors (same node)."""

from swiftk.shm.refs import DTYPES, BadReference, CudaRef, TensorRef
from swiftk.shm.segments import Arena, Mapping, OutputFull, Segment

__all__ = ["DTYPES", "Arena", "BadReference", "CudaRef", "Mapping", "OutputFull", "Segment", "TensorRef"]
