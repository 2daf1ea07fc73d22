"""Python values <-> wire values: tensors become descriptors into shared memory, contract records become
``Struct``s, everything else must be plain msgpack data (None, bool, int, float, str, bytes, list, dict).

The kernel side (``KernelCodec``) copies tensors into its input arenas and reads results out of its output
arenas; the host side (``HostCodec``) maps inputs read-only and writes results into the output segments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from swiftk.contracts.chunked import is_split
from swiftk.contracts.types import Batch, LossResult, ModelOutputs, StepState
from swiftk.hosts.messages import Struct
from swiftk.shm.refs import BadReference, CudaRef, TensorRef

RECORD_TYPES: dict[str, type[Any]] = {cls.__name__: cls for cls in (Batch, ModelOutputs, LossResult, StepState)}
PLAIN = (type(None), bool, int, float, str, bytes)
EXACTLY_PLAIN = frozenset(PLAIN)


class Unsendable(TypeError):
    """A value that cannot cross a process boundary (a model, an optimizer, an open file...)."""


def to_wire(value: Any, tensor: Callable[[torch.Tensor], Any], where: str = "value") -> Any:
    """``value`` with every tensor replaced by ``tensor(t)`` and every contract record by a ``Struct``.
    ``Unsendable`` names ``where`` the offending value was found."""
    try:
        return _wire(value, tensor)
    except Unsendable as exc:
        raise Unsendable(f"{where}{exc}") from None


def _wire(value: Any, tensor: Callable[[torch.Tensor], Any]) -> Any:
    if type(value) in EXACTLY_PLAIN or isinstance(value, PLAIN):  # a set lookup first: this runs at every call
        return value
    if isinstance(value, torch.Tensor):
        return tensor(value)
    if type(value) is dict or isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise Unsendable(f" is a mapping with a non-string key {k!r}")
            try:
                out[k] = v if type(v) in EXACTLY_PLAIN else _wire(v, tensor)
            except Unsendable as exc:
                raise Unsendable(f".{k}{exc}") from None
        return out
    if isinstance(value, (list, tuple)):
        return [_wire(v, tensor) for v in value]
    record = RECORD_TYPES.get(type(value).__name__)
    if record is not None and type(value) is record:
        return Struct(record.__name__, {name: v if type(v) in EXACTLY_PLAIN else _wire(v, tensor)
                                        for name, v in stored_fields(value).items()})
    raise Unsendable(f" is a {type(value).__module__}.{type(value).__qualname__}, which cannot be sent to a "
                     f"plugin host (only tensors, the contract's records and plain data cross)")


_FIELDS: dict[type[Any], tuple[str, ...]] = {}


def stored_fields(record: Any) -> dict[str, Any]:
    """A contract record's fields as stored: ``ModelOutputs`` made of hidden states crosses without computing its
    logits (the host computes them if its plugin reads them), except with a vocabulary-split head (tensor
    parallelism), whose logits are gathered here."""
    if isinstance(record, ModelOutputs):
        fields = record.fields()
        if is_split(fields["head"]):  # a host has no process group to score a split head with: it gets logits
            return {**fields, "logits": record.logits, "hidden": None, "head": None}
        return fields
    cls = type(record)
    if cls not in _FIELDS:
        _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return {name: getattr(record, name) for name in _FIELDS[cls]}


def from_wire(value: Any, tensor: Callable[[TensorRef | CudaRef], torch.Tensor]) -> Any:
    """The inverse of ``to_wire``; ``BadReference`` for a descriptor or record that does not check out."""
    if type(value) in EXACTLY_PLAIN:
        return value
    if isinstance(value, (TensorRef, CudaRef)):
        return tensor(value)
    if isinstance(value, list):
        return [from_wire(v, tensor) for v in value]
    if isinstance(value, dict):
        return {k: from_wire(v, tensor) for k, v in value.items()}
    if isinstance(value, Struct):
        cls = RECORD_TYPES.get(value.type)
        if cls is None:
            raise BadReference(f"unknown record type {value.type!r}")
        try:
            return cls(**{k: v if type(v) in EXACTLY_PLAIN else from_wire(v, tensor) for k, v in value.fields.items()})
        except TypeError as exc:
            raise BadReference(f"malformed {value.type}: {exc}") from None
    return value


def tensor_bytes(value: Any, cuda: bool | None = None) -> int:
    """Bytes the tensors in ``value`` occupy (to size the output segments before writing any); ``cuda``
    True or False counts only the tensors on a GPU, or only those on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size() + 64 if cuda in (None, value.is_cuda) else 0
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, cuda) for v in value)
    if isinstance(value, Mapping):
        return sum(tensor_bytes(v, cuda) for v in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(tensor_bytes(v, cuda) for v in stored_fields(value).values())
    return 0
