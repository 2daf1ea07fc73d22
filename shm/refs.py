"""Descriptors of tensors that live in shared memory: what crosses the wire instead of the bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Wire name -> dtype. Only plain numeric dtypes cross; anything else is refused by name.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
ALIGN = 64  # every tensor starts on a cache line


class BadReference(ValueError):
    """A descriptor that names an unknown segment, an unknown dtype, or bytes outside its segment."""


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise BadReference(f"tensors of dtype {dtype} cannot cross a process boundary; "
                           f"supported: {', '.join(DTYPES)}") from None


def aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class TensorRef:
    """A contiguous CPU tensor at ``offset`` in shared segment ``segment``.

    ``requires_grad`` marks a differentiable input: the receiver returns the gradient with respect to it.
    """

    segment: int
    offset: int
    dtype: str
    shape: tuple[int, ...]
    requires_grad: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise BadReference(f"unknown dtype {self.dtype!r}") from None

    def check_within(self, size: int) -> None:
        """Raise ``BadReference`` unless the tensor's bytes lie inside a segment of ``size`` bytes."""
        if self.offset < 0 or any(d < 0 for d in self.shape) or len(self.shape) > 16:
            raise BadReference(f"bad tensor descriptor {self}")
        if self.offset % ALIGN:
            raise BadReference(f"tensor at offset {self.offset} is not {ALIGN}-byte aligned")
        if self.offset + self.nbytes > size:
            raise BadReference(f"tensor {list(self.shape)} {self.dtype} at offset {self.offset} runs past the end "
                               f"of segment {self.segment} ({size} bytes)")


@dataclass(frozen=True)
class CudaRef:
    """A contiguous CUDA tensor at ``offset`` in IPC-shared buffer ``buffer`` (same node only)."""

    buffer: int
    offset: int
    dtype: str
    shape: tuple[int, ...]
    requires_grad: bool = False

    def as_tensor_ref(self) -> TensorRef:  # the same bounds arithmetic
        return TensorRef(self.buffer, self.offset, self.dtype, self.shape, self.requires_grad)
