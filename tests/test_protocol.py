"""The wire on its own: frames, the tensor codec and message validation."""

from __future__ import annotations

import itertools
import struct

import lz4.block
import msgpack
import numpy as np
import pytest
import torch

from petald.protocol.errors import ErrorCode, ProtocolError
from petald.protocol.framing import FrameDecoder, encode_frame
from petald.protocol.limits import (
    INT8_BLOCK,
    MAX_ARRAY_LEN,
    MAX_FRAME_BYTES,
    MAX_INT8_BLOCK,
    MAX_STRING,
    MAX_TENSOR_BYTES,
    MAX_TENSOR_DIMS,
    WIRE_FORMATS,
    WIRE_VERSION,
    session_frame_bytes,
)
from petald.protocol.messages import OpenSession, PushOpen, PushTarget, Step, StepOutput
from petald.protocol.tensors import (
    FLOAT16_ABSMAX_RANGE,
    all_finite,
    decode_tensor,
    encode_tensor,
    encode_wire,
)


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
        # Each dimension within its bound, and empty: torch's strides of it overflowed (issue 22, hole 0).
        (lambda m: m.update(shape=[0, MAX_TENSOR_BYTES, MAX_TENSOR_BYTES, MAX_TENSOR_BYTES], data=b""), "limit"),
        (lambda m: m.update(shape=[MAX_TENSOR_BYTES, 0, 2], data=b""), "limit"),
        (lambda m: m.update(data="text"), "bytes"),
    ],
)
def test_bad_tensors_are_refused(mutate, fragment):
    msg = encode_tensor(torch.zeros(2, 3))
    mutate(msg)
    with pytest.raises(ProtocolError, match=fragment) as err:
        decode_tensor(msg)
    assert err.value.code == ErrorCode.BAD_TENSOR


def test_every_boundary_shape_decodes_or_is_a_bad_tensor():
    """Whatever shape a peer puts in a tensor map, decoding gives a tensor or a named refusal, never
    another exception (which a client would not take for the server's failure): every shape of up to
    one dimension too many, of sizes around the bounds, in every dtype and codec, empty or not."""
    dims = [0, 1, 3, MAX_TENSOR_BYTES, MAX_TENSOR_BYTES + 1]
    decoded = 0
    for rank in range(MAX_TENSOR_DIMS + 2):
        for shape in itertools.product(dims, repeat=rank):
            for dtype, codec, data in itertools.product(["float32", "bfloat16"], ["raw", "lz4", "int8"], [b"", bytes(12)]):
                try:
                    decode_tensor({"dtype": dtype, "shape": list(shape), "codec": codec, "data": data,
                                   "block": 64, "outliers": 0})
                    decoded += 1
                except ProtocolError as exc:
                    assert exc.code == ErrorCode.BAD_TENSOR
    assert decoded > 0  # some were valid: the loop reached the end of decoding


@pytest.mark.parametrize("wire", WIRE_FORMATS)
def test_a_reply_in_another_encoding_than_the_sessions_wire_is_refused(wire):
    hidden = _with_outliers(1, 2, 64)
    sent = {"float32": [], "bfloat16": [], "float16": [hidden * 10], "int8": [hidden * 10]}[wire]
    for tensor in [hidden, *sent]:  # what the wire sends: accepted
        StepOutput.from_wire(StepOutput(1, tensor, wire).to_wire(), wire)
    others = {("float32", "raw"), ("bfloat16", "raw"), ("float16", "raw"), ("float32", "lz4")}
    for dtype, codec in others - {(m["dtype"], m["codec"]) for m in (encode_wire(t, wire) for t in [hidden, *sent])}:
        msg = {"type": "output", "step_id": 1, "hidden": encode_tensor(hidden, dtype, codec)}
        with pytest.raises(ProtocolError, match=f"wire format {wire}") as err:
            StepOutput.from_wire(msg, wire)
        assert err.value.code == ErrorCode.BAD_TENSOR


@pytest.mark.parametrize("codec", ["raw", "int8"])
def test_the_largest_step_of_a_session_fits_its_frame_limit(codec):
    """A server refuses a frame header beyond ``session_frame_bytes`` at once: no step of the session,
    encoded at its largest (int8 in blocks of one with every value an outlier, a full push chain of
    the longest strings), may need more."""
    batch, length, hidden, blocks = 2, 5, 64, 3
    values = torch.randn(batch, length, hidden)
    tensor = {"raw": lambda t: encode_tensor(t), "int8": lambda t: encode_tensor(t, "float32", "int8", 1, 64)}[codec]
    longest = "\U0001f600" * MAX_STRING  # 4 UTF-8 bytes a character
    step = {"type": "step", "step_id": 2**31, "position": 2**31, "hidden": tensor(values),
            "prompts": tensor(values.expand(blocks, -1, -1, -1).contiguous()),
            "push": [{"peer_id": longest, "token": bytes(16), "step_id": 2**31, "wire": longest}] * MAX_ARRAY_LEN}
    frame = encode_frame(step)
    limit = session_frame_bytes(batch, length, hidden, blocks)
    assert len(frame) - 4 <= limit < MAX_FRAME_BYTES
    assert session_frame_bytes(1, 8192, 4096, 30) == MAX_FRAME_BYTES  # a long session of a large model


def test_lz4_bomb_is_refused():
    bomb = lz4.block.compress(b"\0" * 10_000, store_size=False)
    with pytest.raises(ProtocolError, match="lz4"):
        decode_tensor({"dtype": "float32", "shape": [10], "codec": "lz4", "data": bomb})


def _with_outliers(*shape: int) -> torch.Tensor:
    """Like a real model's hidden states: most values near 1, a few channels thousands of times larger."""
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    t[..., 7] *= 5000.0
    return t


def test_int8_blocks_round_trip_within_half_a_step_of_their_own_block():
    t = _with_outliers(2, 3, 150)  # 150: the last block of each row is short
    t[1, 2, :] = 0.0  # an all-zero row: zero scales, zero codes
    msg = encode_tensor(t, "float32", "int8")
    # 6 rows, each: 3 blocks (a float16 scale each), 8 outliers (uint16 position, float16 value), 150 codes
    assert msg["block"] == INT8_BLOCK and msg["outliers"] == 8 and len(msg["data"]) == 6 * (3 * 2 + 8 * 4 + 150)
    back = decode_tensor(msgpack.unpackb(msgpack.packb(msg)))
    assert back.dtype == torch.float32 and back.shape == t.shape
    blocks = torch.nn.functional.pad(t, (0, 42)).reshape(2, 3, 3, 64)
    step = (blocks.abs().amax(-1) / 127).repeat_interleave(64, -1)[..., :150]
    assert ((back - t).abs() <= step * 0.51 + 1e-6).all()  # half a step, and the float16 scale's rounding
    assert torch.equal(back[1, 2], torch.zeros(150))
    assert torch.equal(back[..., 7], t[..., 7].half().float())  # the outlier channel, sent apart
    # The outlier's block loses precision, the other blocks of its row do not.
    assert (back[..., 64:] - t[..., 64:]).abs().max() < 0.05
    assert decode_tensor(encode_tensor(torch.ones(3, 0), "float32", "int8")).shape == (3, 0)
    assert torch.equal(decode_tensor(encode_tensor(torch.arange(3.0), "float32", "int8")), torch.arange(3.0))


def _int8_map(**changes) -> dict:
    msg = encode_tensor(torch.randn(2, 100), "float32", "int8")  # 2 rows of 2 blocks and 8 outliers
    msg.update(changes)
    return msg


def _int8_bytes(scales=(1.0,) * 4, positions=tuple(range(8)) * 2, values=(1.0,) * 16, codes=b"\1" * 200) -> bytes:
    """The bytes of a [2, 100] int8 tensor: 4 scales, 16 outlier positions and values, 200 codes."""
    return (torch.tensor(scales, dtype=torch.float16).numpy().tobytes()
            + np.array(positions, dtype="<u2").tobytes()
            + torch.tensor(values, dtype=torch.float16).numpy().tobytes() + codes)


@pytest.mark.parametrize(
    "msg, fragment",
    [
        (_int8_map(block=0), r"block must be an integer in \[1, 4096\], got 0"),
        (_int8_map(block=MAX_INT8_BLOCK + 1), "block must be"),
        (_int8_map(block=True), "block must be"),
        (_int8_map(block=None), "block must be"),
        (_int8_map(outliers=-1), r"outliers must be an integer in \[0, 64\]"),
        (_int8_map(outliers=65), "outliers must be"),
        (_int8_map(outliers=None), "outliers must be"),
        (_int8_map(shape=[2, 4], outliers=8, data=b""), r"outliers must be an integer in \[0, 4\]"),
        (_int8_map(shape=[]), "at least one dimension"),
        (_int8_map(block=32), r"in blocks of 32 with 8 outliers a row needs 280 bytes \(8 float16 scales, 16 outlier "
                              r"positions and values, 200 codes\), got 272"),
        (_int8_map(data=_int8_bytes()[:-1]), "needs 272 bytes .* got 271"),
        (_int8_map(data=_int8_bytes(scales=(1.0,) * 5)), "got 274"),
        (_int8_map(data=_int8_bytes(scales=(1.0, float("nan"), 1.0, 1.0))), "scales must be finite and non-negative"),
        (_int8_map(data=_int8_bytes(scales=(1.0, 1.0, float("inf"), 1.0))), "scales must be finite"),
        (_int8_map(data=_int8_bytes(scales=(1.0, 1.0, 1.0, -1.0))), "non-negative"),
        (_int8_map(data=_int8_bytes(values=(1.0,) * 15 + (float("inf"),))), "outlier values must be finite"),
        (_int8_map(data=_int8_bytes(positions=tuple(range(8)) + (0, 1, 2, 3, 4, 5, 6, 100))),
         "outlier positions must be below 100 and increasing"),
        (_int8_map(data=_int8_bytes(positions=(0, 1, 2, 3, 4, 5, 7, 6) + tuple(range(8)))), "increasing"),
        (_int8_map(data=_int8_bytes(positions=(0, 0, 2, 3, 4, 5, 6, 7) + tuple(range(8)))), "increasing"),
        (_int8_map(data=_int8_bytes(codes=b"\x80" + b"\1" * 199)), r"codes must be in \[-127, 127\]"),
        (_int8_map(dtype="int8"), "dtype"),
        (_int8_map(shape=[10**6, 10**6]), "limit"),
    ],
)
def test_malformed_int8_tensors_are_bad_tensors(msg, fragment):
    with pytest.raises(ProtocolError, match=fragment) as err:
        decode_tensor(msg, "hidden")
    assert err.value.code == ErrorCode.BAD_TENSOR and err.value.message.startswith("hidden: ")


def test_float16_and_int8_wires_send_what_float16_cannot_hold_as_bfloat16():
    low, high = FLOAT16_ABSMAX_RANGE
    hidden = _with_outliers(1, 4, 64)  # absmax ~ 10^4: within float16's range
    assert encode_wire(hidden, "float16")["dtype"] == "float16"
    assert encode_wire(hidden * 10, "float16")["dtype"] == "bfloat16"  # beyond 65504: inf as float16
    assert encode_wire(torch.full((4,), high), "float16")["dtype"] == "float16"
    assert encode_wire(torch.full((4,), low / 4), "float16")["dtype"] == "bfloat16"  # would be subnormal
    big = decode_tensor(encode_wire(hidden * 10, "float16"))
    assert all_finite(big) and torch.allclose(big.float(), hidden * 10, rtol=2**-8)
    # int8 sends its outliers as float16: a tensor beyond float16's range goes whole as bfloat16.
    assert encode_wire(hidden, "int8")["codec"] == "int8"
    assert encode_wire(hidden * 10, "int8")["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="outliers as float16"):
        encode_tensor(hidden * 10, "float32", "int8")


@pytest.mark.parametrize("wire", WIRE_FORMATS)
def test_every_wire_format_crosses_in_a_step(wire):
    hidden = _with_outliers(1, 1, 576)
    msg = Step(1, 0, hidden, wire).to_wire()
    back = Step.from_wire(_through_the_wire(msg)).hidden
    size = {"float32": 4 * 576, "bfloat16": 2 * 576, "float16": 2 * 576, "int8": 576 + 2 * 9 + 4 * 8}[wire]
    assert len(msg["hidden"]["data"]) == size and back.shape == hidden.shape
    assert (back.float() - hidden).abs().max() <= hidden.abs().max() / (127 if wire == "int8" else 100)
    with pytest.raises(ValueError, match="unknown wire format"):
        encode_wire(hidden, "int4")


def test_open_checks_every_field_and_the_version():
    good = OpenSession("m", "f", 0, 2, 1, 16).to_wire()
    assert OpenSession.from_wire(dict(good)).end == 2
    for key, value in [("start", -1), ("batch", 0), ("batch", 10**6), ("wire", "int4"), ("wire", "auto"), ("model_id", 5)]:
        with pytest.raises(ProtocolError, match=key) as err:
            OpenSession.from_wire({**good, key: value})
        assert err.value.code == ErrorCode.BAD_MESSAGE
    with pytest.raises(ProtocolError) as err:
        OpenSession.from_wire({**good, "wire_version": WIRE_VERSION + 1})
    assert err.value.code == ErrorCode.VERSION


def test_step_carries_its_tensor():
    step = Step(3, 7, torch.ones(1, 2, 4), "float16")
    back = Step.from_wire(msgpack.unpackb(encode_frame(step.to_wire())[4:]))
    assert (back.step_id, back.position) == (3, 7) and back.hidden.dtype == torch.float16


def _through_the_wire(msg: dict) -> dict:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(msg))
    return decoder.next_message()


def test_pushes_cross_the_wire():
    token = bytes(range(16))
    targets = [PushTarget("peer0", token, 5), PushTarget("peer1", token, 6, wire="int8")]
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
        (Step.from_wire, {**step, "push": [{**target, "wire": "int4"}]}),
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
    frame = encode_frame(Step(1, 0, torch.zeros(64, 8, 4096), "bfloat16").to_wire())
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


def test_a_step_output_says_how_long_the_server_held_the_step():
    output = StepOutput(3, torch.ones(1, 1, 4), held_ms=12.5)
    assert StepOutput.from_wire(_through_the_wire(output.to_wire())).held_ms == 12.5
    assert StepOutput.from_wire(_through_the_wire({**output.to_wire(), "held_ms": 0})).held_ms == 0.0
    assert "held_ms" not in StepOutput(3, torch.ones(1, 1, 4)).to_wire()
    assert StepOutput.from_wire(_through_the_wire(StepOutput(3, torch.ones(1, 1, 4)).to_wire())).held_ms is None
    for bad in (-1.0, float("nan"), float("inf"), "5", True, None, [1.0]):
        with pytest.raises(ProtocolError) as err:
            StepOutput.from_wire({**output.to_wire(), "held_ms": bad})
        assert err.value.code == ErrorCode.BAD_MESSAGE and "held_ms" in err.value.message
