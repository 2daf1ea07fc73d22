"""Tensor descriptors: sizes, bounds and dtypes are checked, never trusted."""

from __future__ import annotations

import pytest
import torch

from swiftk.shm import BadReference, TensorRef
from swiftk.shm.refs import dtype_name


def test_nbytes_and_bounds() -> None:
    ref = TensorRef(0, 64, "bfloat16", (3, 4))
    assert ref.numel == 12 and ref.nbytes == 24
    ref.check_within(88)
    with pytest.raises(BadReference):
        ref.check_within(87)
    with pytest.raises(BadReference):
        TensorRef(0, -1, "float32", (1,)).check_within(100)
    with pytest.raises(BadReference, match="unknown dtype"):
        TensorRef(0, 0, "complex64", (1,)).check_within(100)


def test_unsupported_dtypes_are_named() -> None:
    with pytest.raises(BadReference, match="complex64"):
        dtype_name(torch.complex64)


def test_unaligned_offsets_are_refused() -> None:
    with pytest.raises(BadReference, match="aligned"):
        TensorRef(0, 2, "float32", (1,)).check_within(100)
