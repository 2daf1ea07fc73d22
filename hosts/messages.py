"""Every message between the kernel and a plugin host, as typed records, and their msgpack encoding.

A frame is ``[TAG, {field: value}]``. Tensors travel as ``TensorRef`` / ``CudaRef`` descriptors (msgpack
extension types), never as bytes; the contract's records (``Batch``, ``StepState``...) travel as ``Struct``.
``decode`` trusts nothing: any frame that is not exactly one of these records, with fields of the declared
types, raises ``ProtocolError`` (the kernel then treats the host as broken).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin

import msgpack

from swiftk.shm.refs import CudaRef, TensorRef

MAX_FRAME = 64 << 20  # a control message is small; tensors never travel inside one
EXT_TENSOR, EXT_CUDA, EXT_STRUCT = 1, 2, 3


class ProtocolError(Exception):
    """A frame that is not a well-formed message (garbage, truncated, wrong types, too large)."""


@dataclass(frozen=True)
class Struct:
    """One of the contract's records (``Batch``, ``ModelOutputs``, ``LossResult``, ``StepState``) by type name."""

    type: str
    fields: dict[str, Any]


# -- handshake ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HelloRequest:
    contract_version: str
    token: str  # secret from the host's environment: proves the peer is the host this kernel spawned
    sources: list[str]  # plugin files or modules to import
    names: list[str]  # the config's name for each source


@dataclass(frozen=True)
class Registration:
    kind: str
    name: str
    contract: str | None
    target: str  # qualified name, for messages


@dataclass(frozen=True)
class HookInfo:
    name: str
    argnames: list[str]
    tryfirst: bool = False
    trylast: bool = False


@dataclass(frozen=True)
class SourceInfo:
    source: str
    name: str
    code_hash: str
    registrations: list[Registration]
    module_hooks: list[HookInfo]  # the module's own @hookimpl functions (instance id = its index + 1, negated)
    error: str | None = None  # the import failed


@dataclass(frozen=True)
class HelloReply:
    contract_version: str
    token: str
    pid: int
    versions: dict[str, str]  # python, torch
    sources: list[SourceInfo]
    sandbox: dict[str, str] | None = None  # a sandboxed host: layer -> what it got, read back from /proc


# -- plugins -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildRequest:
    instance: int  # the kernel's id for the built object
    kind: str
    name: str
    config: dict[str, Any]


@dataclass(frozen=True)
class BuildReply:
    instance: int
    hooks: list[HookInfo]
    stateful: bool  # has state_dict / load_state_dict
    problems: list[str]


@dataclass(frozen=True)
class CudaBufferEvent:
    buffer: int
    handle: list[Any]  # see shm.cuda.share_handle
    writable: bool


@dataclass(frozen=True)
class CallRequest:
    call_id: int
    instance: int
    hook: str
    kwargs: dict[str, Any]  # wire values: scalars, lists, dicts, TensorRef, CudaRef, Struct
    cuda_buffers: list[CudaBufferEvent] = field(default_factory=list)  # to open before reading kwargs


@dataclass(frozen=True)
class CallReply:
    call_id: int  # echoes CallRequest.call_id
    result: Any  # wire value; tensors written into slots the kernel allocated
    grads: list[Any]  # TensorRef | CudaRef | None per differentiable input, in the order they were sent
    error: str | None = None  # set: the call failed, the host lives on
    traceback: str | None = None
    needed_bytes: int = 0  # set: the output segments were too small; grow them and call again
    needed_device: int = -1  # where: -1 the CPU segments, else the CUDA device index


@dataclass(frozen=True)
class StateRequest:
    instance: int
    load: Any = None  # None: return the state; otherwise the state to load
    cuda_buffers: list[CudaBufferEvent] = field(default_factory=list)


@dataclass(frozen=True)
class StateReply:
    instance: int
    state: Any
    error: str | None = None
    needed_bytes: int = 0  # as in CallReply
    needed_device: int = -1


# -- control channel ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeartbeatEvent:
    pid: int
    seq: int
    sent_at: float  # time.monotonic() in the host (one clock per machine)


@dataclass(frozen=True)
class ShutdownRequest:
    reason: str


@dataclass(frozen=True)
class SegmentEvent:
    """Sent with a file descriptor (SCM_RIGHTS) on the host's Unix socket: a new shared segment."""

    segment: int
    size: int
    writable: bool


Message = (HelloRequest | HelloReply | BuildRequest | BuildReply | CallRequest | CallReply | StateRequest
           | StateReply | HeartbeatEvent | ShutdownRequest | SegmentEvent)
RECORDS: dict[str, type[Any]] = {cls.__name__: cls for cls in get_args(Message)}
NESTED: dict[type[Any], str] = {cls: cls.__name__ for cls in (Registration, HookInfo, SourceInfo, CudaBufferEvent)}


def encode(message: Message) -> bytes:
    frame: bytes = msgpack.packb([type(message).__name__, _fields(message)], default=_default, use_bin_type=True)
    return frame


def _fields(record: Any) -> dict[str, Any]:
    return {name: _plain(getattr(record, name)) for name, _, _ in _layout(type(record))}


def _plain(value: Any) -> Any:
    if type(value) in NESTED:
        return _fields(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _default(obj: Any) -> Any:
    if isinstance(obj, TensorRef):
        return msgpack.ExtType(EXT_TENSOR, msgpack.packb(
            [obj.segment, obj.offset, obj.dtype, list(obj.shape), obj.requires_grad]))
    if isinstance(obj, CudaRef):
        return msgpack.ExtType(EXT_CUDA, msgpack.packb(
            [obj.buffer, obj.offset, obj.dtype, list(obj.shape), obj.requires_grad]))
    if isinstance(obj, Struct):
        return msgpack.ExtType(EXT_STRUCT, msgpack.packb([obj.type, obj.fields], default=_default,
                                                          use_bin_type=True))
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} cannot be sent to a plugin host")


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext, raw=False, strict_map_key=True)


def _ext(code: int, data: bytes) -> Any:
    if code in (EXT_TENSOR, EXT_CUDA):
        fields = _unpack(data)
        if not (isinstance(fields, list) and len(fields) == 5):
            raise ProtocolError("a tensor descriptor is not [segment, offset, dtype, shape, requires_grad]")
        where, offset, dtype, shape, grad = fields
        if not (_is_int(where) and _is_int(offset) and isinstance(dtype, str) and isinstance(shape, list)
                and all(_is_int(d) for d in shape) and isinstance(grad, bool)):
            raise ProtocolError(f"a tensor descriptor has wrong field types: {fields!r:.200}")
        cls = TensorRef if code == EXT_TENSOR else CudaRef
        return cls(where, offset, dtype, tuple(shape), grad)
    if code == EXT_STRUCT:
        fields = _unpack(data)
        if not (isinstance(fields, list) and len(fields) == 2 and isinstance(fields[0], str)
                and isinstance(fields[1], dict)):
            raise ProtocolError("a struct is not [type, {fields}]")
        return Struct(fields[0], fields[1])
    raise ProtocolError(f"unknown msgpack extension type {code}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decode(frame: bytes) -> Message:
    """The record ``frame`` holds; ``ProtocolError`` for anything else."""
    if len(frame) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {MAX_FRAME}-byte limit")
    try:
        data = _unpack(frame)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several types for garbage and truncation
        raise ProtocolError(f"undecodable frame ({type(exc).__name__}: {exc})") from None
    if not (isinstance(data, list) and len(data) == 2 and isinstance(data[0], str) and isinstance(data[1], dict)):
        raise ProtocolError(f"a frame must be [TAG, {{fields}}], got {type(data).__name__}")
    tag, fields = data
    if tag not in RECORDS:
        raise ProtocolError(f"unknown message type {tag!r:.80}")
    return _record(RECORDS[tag], fields)  # type: ignore[no-any-return]


def _record(cls: type[Any], fields: Any) -> Any:
    if not isinstance(fields, dict):
        raise ProtocolError(f"{cls.__name__}: expected a map of fields")
    layout = _layout(cls)
    if len(fields) > len(layout) or not fields.keys() <= _NAMES[cls]:
        unknown = sorted(map(str, set(fields) - _NAMES[cls]))
        raise ProtocolError(f"{cls.__name__}: unknown fields {unknown}")
    values = {}
    for name, check, required in _CHECKS[cls]:
        if name not in fields:
            if required:
                raise ProtocolError(f"{cls.__name__}: missing field {name!r}")
            continue
        values[name] = check(fields[name], f"{cls.__name__}.{name}")
    return cls(**values)


Check = Callable[[Any, str], Any]  # (value, where) -> the value as the record holds it, or ProtocolError
_LAYOUTS: dict[type[Any], list[tuple[str, Any, bool]]] = {}
_NAMES: dict[type[Any], set[str]] = {}
_CHECKS: dict[type[Any], list[tuple[str, Check, bool]]] = {}


def _layout(cls: type[Any]) -> list[tuple[str, Any, bool]]:
    """(name, type hint, required) per field of a record, computed once per class (with its fields' checks)."""
    if cls not in _LAYOUTS:
        hints = typing.get_type_hints(cls)
        _LAYOUTS[cls] = [(f.name, hints[f.name], f.default is dataclasses.MISSING
                          and f.default_factory is dataclasses.MISSING) for f in dataclasses.fields(cls)]
        _NAMES[cls] = {name for name, _, _ in _LAYOUTS[cls]}
        _CHECKS[cls] = [(name, _check(hint), required) for name, hint, required in _LAYOUTS[cls]]
    return _LAYOUTS[cls]


_COMPILED: dict[Any, Check] = {}


def _check(hint: Any) -> Check:
    """The check of ``hint``, built once per hint: a frame is checked at every call, so the hint's structure
    (``get_origin`` / ``get_args``) is read here and not per value."""
    if hint not in _COMPILED:
        _COMPILED[hint] = _compile(hint)
    return _COMPILED[hint]


def _compile(hint: Any) -> Check:
    name = getattr(hint, "__name__", hint)

    def wrong(value: Any, where: str) -> ProtocolError:
        return ProtocolError(f"{where}: expected {name}, got {type(value).__name__}")

    if hint is Any:
        return lambda value, where: value
    if hint is int or hint is str:  # exactly: a bool is not an int here
        def exact(value: Any, where: str) -> Any:
            if type(value) is hint:
                return value
            raise wrong(value, where)
        return exact
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        checks = [_check(option) for option in options]
        optional = type(None) in options

        def union(value: Any, where: str) -> Any:
            if value is None and optional:  # the common case, without trying each option
                return None
            for check in checks:
                try:
                    return check(value, where)
                except ProtocolError:
                    continue
            raise ProtocolError(f"{where}: {type(value).__name__} is not {hint}")
        return union
    if hint is type(None):
        def none(value: Any, where: str) -> Any:
            if value is None:
                return None
            raise wrong(value, where)
        return none
    if origin is list:
        (item_hint,) = get_args(hint)
        item = _check(item_hint)

        def sequence(value: Any, where: str) -> Any:
            if isinstance(value, list):
                return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
            raise wrong(value, where)
        return sequence
    if origin is dict:
        _, value_hint = get_args(hint)
        if value_hint is Any:
            def anything(value: Any, where: str) -> Any:
                if isinstance(value, dict):
                    return {k: v for k, v in value.items() if isinstance(k, str)}
                raise wrong(value, where)
            return anything
        entry = _check(value_hint)

        def mapping(value: Any, where: str) -> Any:
            if isinstance(value, dict):
                return {k: entry(v, f"{where}.{k}") for k, v in value.items() if isinstance(k, str)}
            raise wrong(value, where)
        return mapping
    if hint in NESTED:
        return lambda value, where: _record(hint, value)
    if hint is float:
        def number(value: Any, where: str) -> Any:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            raise wrong(value, where)
        return number
    if isinstance(hint, type):
        def instance(value: Any, where: str) -> Any:
            if isinstance(value, hint):
                return value
            raise wrong(value, where)
        return instance
    raise TypeError(f"no wire check for the type hint {hint!r}")  # a new field type needs a case here
