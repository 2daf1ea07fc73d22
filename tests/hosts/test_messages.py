"""The wire format: every record round-trips, and decoding anything else raises ProtocolError, nothing else."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swiftk.hosts import messages as m
from swiftk.shm import TensorRef

SAMPLES = [
    m.HelloRequest("0.1.0", "t0k3n", ["a.py"], ["a"]),
    m.HelloReply("0.1.0", "t0k3n", 42, {"python": "3.11"}, [m.SourceInfo(
        "a.py", "a", "abc", [m.Registration("loss", "x", None, "X")], [m.HookInfo("swiftk_step_end", ["state"])])]),
    m.BuildRequest(1, "loss", "focal", {"gamma": 2.0}),
    m.BuildReply(1, [m.HookInfo("swiftk_loss_compute", ["batch", "outputs"], tryfirst=True)], False, []),
    m.CallRequest(3, 1, "swiftk_loss_compute", {"x": TensorRef(0, 64, "bfloat16", (2, 3), True),
                                                "s": m.Struct("StepState", {"step": 1})}),
    m.CallReply(3, {"loss": TensorRef(1 << 20, 0, "float32", ())}, [None, TensorRef(1 << 20, 64, "float32", (2,))]),
    m.StateReply(1, {"steps": 3}),
    m.HeartbeatEvent(42, 7, 1.5),
    m.ShutdownRequest("done"),
    m.SegmentEvent(0, 1 << 20, False),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda x: type(x).__name__)
def test_every_record_round_trips(message: m.Message) -> None:
    assert m.decode(m.encode(message)) == message


def decodes_or_protocol_error(frame: bytes) -> None:
    try:
        m.decode(frame)
    except m.ProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_garbage_is_a_protocol_error(frame: bytes) -> None:
    decodes_or_protocol_error(frame)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_truncated_frames_are_protocol_errors(message: m.Message, data: st.DataObject) -> None:
    frame = m.encode(message)
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(m.ProtocolError):
        m.decode(frame[:cut])


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
                       | st.binary(max_size=8), lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=10)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(m.RECORDS)), st.dictionaries(st.text(max_size=12), JSONISH, max_size=6))
def test_wrong_field_types_are_protocol_errors(tag: str, fields: dict) -> None:
    decodes_or_protocol_error(msgpack.packb([tag, fields]))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_each_field_replaced_by_a_wrong_value_is_caught(message: m.Message, data: st.DataObject) -> None:
    tag, fields = msgpack.unpackb(m.encode(message), raw=False, ext_hook=msgpack.ExtType)
    name = data.draw(st.sampled_from(sorted(fields)))
    fields[name] = data.draw(JSONISH)
    decodes_or_protocol_error(msgpack.packb([tag, fields]))


@pytest.mark.parametrize("ext", [
    msgpack.ExtType(m.EXT_TENSOR, msgpack.packb([0, 0, "float32"])),  # too few fields
    msgpack.ExtType(m.EXT_TENSOR, msgpack.packb([0, "x", "float32", [1], False])),
    msgpack.ExtType(m.EXT_STRUCT, msgpack.packb(["Batch"])),
    msgpack.ExtType(99, b"\x00"),
    msgpack.ExtType(m.EXT_TENSOR, b"\xc1"),  # a byte msgpack never uses
])
def test_malformed_extensions_are_protocol_errors(ext: msgpack.ExtType) -> None:
    with pytest.raises(m.ProtocolError):
        m.decode(msgpack.packb(["CallReply", {"call_id": 1, "result": ext, "grads": []}]))


def test_huge_frames_and_claimed_sizes_are_refused() -> None:
    with pytest.raises(m.ProtocolError, match="exceeds"):
        m.decode(b"\x00" * (m.MAX_FRAME + 1))
    with pytest.raises(m.ProtocolError):  # a map header claiming 2**32-1 entries, with none present
        m.decode(b"\x92\xa9CallReply\xdf\xff\xff\xff\xff")
