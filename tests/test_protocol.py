"""The wire on its own: frames, the tensor codec and message validation."""

from __future__ import annotations

import struct

import lz4.block
import msgpack
import pytest
import torch

from petald.protocol.errors import ErrorCode, ProtocolError
from petald.protocol.framing import FrameDecoder, encode_frame
from petald.protocol.limits import WIRE_VERSION
from petald.protocol.messages import OpenSession, PushOpen, PushTarget, Step, StepOutput
from petald.protocol.tensors import all_finite, decode_tensor, encode_tensor


def test_frames_roundtrip_across_arbitrary_splits():
    frames = encode_frame({"type": "a", "x": 1}) + encode_frame({"type": "b", "blob": b"\0" * 1000})
    decoder, got = FrameDecoder(), []
    for i in range(0, len(frames), 7):
        decoder.feed(frames[i : i + 7])
        while (msg := decoder.next_message()) is not None:
            got.append(msg)
    assert [m["type"] for m in got] == ["a", "b"] and got[1]["blob"] == b"\0" * 1000


def test_oversized_frame_is_refused_from_its_header_alone():
    decoder = FrameDecoder(max_frame_bytes=1024)
    decoder.feed(struct.pack(">I", 10**9))
    with pytest.raises(ProtocolError) as err:
        decoder.wanted()
    assert err.value.code == ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(ProtocolError):
        encode_frame({"type": "x", "b": b"\0" * 2048}, max_frame_bytes=1024)


@pytest.mark.parametrize("body", [b"\xc1\xc1\xc1", msgpack.packb([1, 2]), msgpack.packb({"no": "type"})])
def test_malformed_bodies_are_bad_frames(body):
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError) as err:
        decoder.next_message()
    assert err.value.code == ErrorCode.BAD_FRAME


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("codec", ["raw", "lz4"])
def test_tensor_codec_roundtrip(dtype, codec):
    t = torch.randn(2, 3, 5)
    back = decode_tensor(msgpack.unpackb(msgpack.packb(encode_tensor(t, dtype, codec))))
    assert back.shape == t.shape and str(back.dtype) == f"torch.{dtype}"
    assert torch.equal(back, t.to(back.dtype))


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda m: m.update(dtype="int64"), "dtype"),
        (lambda m: m.update(codec="zstd"), "codec"),
        (lambda m: m.update(shape=[2, -3]), "shape"),
        (lambda m: m.update(shape=[1, 1, 1, 1, 1]), "shape"),
        (lambda m: m.update(shape=[4, 4]), "needs"),
        (lambda m: m.update(shape=[10**6, 10**6]), "limit"),
        (lambda m: m.update(shape=[1, 0, 2**64 - 1], data=b""), "shape"),
        (lambda m: m.update(shape=[0, 2**40, 2**40], data=b""), "shape"),
        (lambda m: m.update(data="text"), "bytes"),
    ],
)
def test_bad_tensors_are_refused(mutate, fragment):
    msg = encode_tensor(torch.zeros(2, 3))
    mutate(msg)
    with pytest.raises(ProtocolError, match=fragment) as err:
        decode_tensor(msg)
    assert err.value.code == ErrorCode.BAD_TENSOR


def test_lz4_bomb_is_refused():
    bomb = lz4.block.compress(b"\0" * 10_000, store_size=False)
    with pytest.raises(ProtocolError, match="lz4"):
        decode_tensor({"dtype": "float32", "shape": [10], "codec": "lz4", "data": bomb})


def test_open_checks_every_field_and_the_version():
    good = OpenSession("m", "f", 0, 2, 1, 16).to_wire()
    assert OpenSession.from_wire(dict(good)).end == 2
    for key, value in [("start", -1), ("batch", 0), ("batch", 10**6), ("wire_dtype", "int8"), ("model_id", 5)]:
        with pytest.raises(ProtocolError, match=key) as err:
            OpenSession.from_wire({**good, key: value})
        assert err.value.code == ErrorCode.BAD_MESSAGE
    with pytest.raises(ProtocolError) as err:
        OpenSession.from_wire({**good, "wire_version": WIRE_VERSION + 1})
    assert err.value.code == ErrorCode.VERSION


def test_step_carries_its_tensor():
    step = Step(3, 7, torch.ones(1, 2, 4), "float16", "lz4")
    back = Step.from_wire(msgpack.unpackb(encode_frame(step.to_wire())[4:]))
    assert (back.step_id, back.position) == (3, 7) and back.hidden.dtype == torch.float16


def _through_the_wire(msg: dict) -> dict:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(msg))
    return decoder.next_message()


def test_pushes_cross_the_wire():
    token = bytes(range(16))
    targets = [PushTarget(f"peer{i}", token, 5 + i) for i in range(2)]
    back = Step.from_wire(_through_the_wire(Step(3, 7, torch.ones(1, 1, 4), push=targets).to_wire()))
    assert back.push == targets
    assert "push" not in Step(3, 7, torch.ones(1, 1, 4)).to_wire() and Step.from_wire(
        _through_the_wire(Step(3, 7, torch.ones(1, 1, 4)).to_wire())).push == []
    assert StepOutput.from_wire(_through_the_wire(StepOutput(3, torch.ones(1, 1, 4), pushed=True).to_wire())).pushed
    assert not StepOutput.from_wire(_through_the_wire(StepOutput(3, torch.ones(1, 1, 4)).to_wire())).pushed
    opened = OpenSession("m", "f", 0, 2, 1, 16, push_token=token)
    assert OpenSession.from_wire(_through_the_wire(opened.to_wire())).push_token == token
    assert "push_token" not in OpenSession("m", "f", 0, 2, 1, 16).to_wire()
    assert PushOpen.from_wire(_through_the_wire(PushOpen(token).to_wire())).token == token


def test_bad_push_fields_are_bad_messages():
    token = bytes(range(16))
    target = PushTarget("p", token, 1).to_wire()
    step = Step(1, 0, torch.ones(1, 1, 4)).to_wire()
    bad = [
        (OpenSession.from_wire, {**OpenSession("m", "f", 0, 2, 1, 16).to_wire(), "push_token": b"short"}),
        (PushOpen.from_wire, {"type": "push_open", "token": "not bytes"}),
        (Step.from_wire, {**step, "push": target}),  # not a list
        (Step.from_wire, {**step, "push": [target] * 17}),
        (Step.from_wire, {**step, "push": [5]}),
        (Step.from_wire, {**step, "push": [{**target, "token": token[:8]}]}),
        (Step.from_wire, {**step, "push": [{**target, "step_id": -1}]}),
        (StepOutput.from_wire, {**StepOutput(1, torch.ones(1, 1, 4)).to_wire(), "pushed": 1}),
    ]
    for parse, msg in bad:
        with pytest.raises(ProtocolError) as err:
            parse(msg)
        assert err.value.code == ErrorCode.BAD_MESSAGE


def test_container_bombs_are_bad_frames_not_gigabytes():
    # 1 MiB of empty maps would be a million Python dicts without container limits.
    body = b"\x91" + b"\xdd" + struct.pack(">I", 1 << 20) + b"\x80" * (1 << 20)
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError) as err:
        decoder.next_message()
    assert err.value.code == ErrorCode.BAD_FRAME


def test_a_real_step_fits_the_container_limits():
    frame = encode_frame(Step(1, 0, torch.zeros(64, 8, 4096), "bfloat16", "lz4").to_wire())
    decoder = FrameDecoder()
    decoder.feed(frame)
    assert Step.from_wire(decoder.next_message()).hidden.shape == (64, 8, 4096)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_finds_nan_and_infinity_in_every_wire_dtype(dtype):
    t = torch.randn(2, 3, 8).to(dtype)
    assert all_finite(t)
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = t.clone()
        broken[1, 2, 7] = bad
        assert not all_finite(broken)
    assert all_finite(torch.empty(1, 0, 8, dtype=dtype))
    assert not all_finite(torch.full((4,), float("nan"), requires_grad=True))
