"""The tensor codec: ``{dtype, shape, codec, data}`` maps inside frames (int8 adds ``block``, ``outliers``).

``dtype`` is the decoded tensor's dtype; ``codec`` says how ``data`` holds it: ``raw`` bytes,
``lz4`` over them, or ``int8`` (``int8_blocks.py``). ``encode_wire`` encodes for a wire format
(a session's choice, ``limits.WIRE_FORMATS``), choosing dtype and codec per tensor.

Decoding trusts nothing: the dtype and codec must be known, the shape small and
non-negative, and the bytes must be exactly what dtype and shape imply (lz4 is
decompressed into a buffer of that exact size, so no input can inflate past it).
Given the session's wire format, it also refuses a dtype and codec that format never sends
(a server answering a float32 session in bfloat16 is faulty, whatever its values).
"""

from __future__ import annotations

import math
from typing import Any

import lz4.block
import numpy as np
import torch

from petald.protocol.errors import ErrorCode, ProtocolError
from petald.protocol.int8_blocks import dequantize, outliers_for, quantize
from petald.protocol.limits import (
    CODECS,
    INT8_BLOCK,
    INT8_OUTLIERS,
    MAX_TENSOR_BYTES,
    MAX_TENSOR_DIMS,
    WIRE_DTYPES,
    WIRE_FORMATS,
)

_TORCH = {name: getattr(torch, name) for name in WIRE_DTYPES}
_ITEM_BYTES = {name: torch.empty((), dtype=t).element_size() for name, t in _TORCH.items()}
_NUMPY_FLOATS = (torch.float32, torch.float16)  # numpy has no bfloat16

# The "float16" wire sends a tensor as float16 when its absmax lies in this range, else as bfloat16.
# float16 keeps 3 more mantissa bits than bfloat16 (10 against 7), so where it can hold the values
# it is the closer 16-bit copy: up to its largest finite value (hidden states of real models reach
# tens of thousands in a few outlier channels: SmolLM2's reach 22,000, within range), and down to
# where most values would fall below its smallest normal (6e-5) and lose their precision (small
# gradients); bfloat16 has float32's range for the rest. The decoder reads the dtype each tensor says.
FLOAT16_ABSMAX_RANGE = (2.0**-6, 65504.0)

# The (dtype, codec) pairs ``encode_wire`` sends for each wire format: what a receiver that knows
# the format accepts, and nothing else.
WIRE_ENCODINGS: dict[str, frozenset[tuple[str, str]]] = {
    "float32": frozenset({("float32", "raw")}),
    "bfloat16": frozenset({("bfloat16", "raw")}),
    "float16": frozenset({("float16", "raw"), ("bfloat16", "raw")}),
    "int8": frozenset({("float32", "int8"), ("bfloat16", "raw")}),
}
assert set(WIRE_ENCODINGS) == set(WIRE_FORMATS)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in ``tensor`` (a CPU tensor, as decoded from the wire).

    numpy answers for a decode step's hidden state in ~2.5 us against ~8 us for torch's
    isfinite/all/bool (three operator dispatches): this check runs on both ends of every hop.
    """
    if tensor.dtype in _NUMPY_FLOATS and tensor.device.type == "cpu" and not tensor.requires_grad:
        return bool(np.isfinite(tensor.numpy()).all())
    return bool(torch.isfinite(tensor).all())


def encode_wire(tensor: torch.Tensor, wire: str) -> dict[str, Any]:
    """``tensor`` as the wire format ``wire`` sends it (``limits.WIRE_FORMATS``)."""
    if wire not in WIRE_FORMATS:
        raise ValueError(f"unknown wire format {wire!r}: use {', '.join(WIRE_FORMATS)}")
    if wire not in ("float16", "int8"):
        return encode_tensor(tensor, wire)
    absmax = float(tensor.detach().abs().max()) if tensor.numel() else 1.0
    low, high = FLOAT16_ABSMAX_RANGE
    if wire == "int8" and absmax <= high:
        return encode_tensor(tensor, "float32", "int8")
    if wire == "float16" and low <= absmax <= high:
        return encode_tensor(tensor, "float16")
    # Beyond float16's range (int8 sends its outliers as float16), or NaN, which the receiver refuses.
    return encode_tensor(tensor, "bfloat16")


def encode_tensor(tensor: torch.Tensor, dtype: str = "float32", codec: str = "raw",
                  block: int = INT8_BLOCK, outliers: int = INT8_OUTLIERS) -> dict[str, Any]:
    """``tensor`` as ``dtype`` (what the receiver decodes to) with ``codec``; int8 in blocks of ``block``
    with up to ``outliers`` values of each row apart."""
    if dtype not in _TORCH or codec not in CODECS:
        raise ValueError(f"unsupported wire dtype {dtype!r} or codec {codec!r}")
    if codec == "int8":
        if tensor.dim() == 0 or tensor.numel() * _ITEM_BYTES[dtype] > MAX_TENSOR_BYTES:
            raise ValueError(f"int8 takes tensors of at least one dimension, decoding to at most "
                             f"{MAX_TENSOR_BYTES} bytes; chunk it")
        k = outliers_for(tensor.shape[-1], outliers)
        return {"dtype": dtype, "shape": list(tensor.shape), "codec": codec, "block": block, "outliers": k,
                "data": quantize(tensor, block, k)}
    t = tensor.detach()
    if t.dtype is not _TORCH[dtype] or t.device.type != "cpu" or not t.is_contiguous():
        t = t.to(device="cpu", dtype=_TORCH[dtype]).contiguous()
    if t.numel() * t.element_size() > MAX_TENSOR_BYTES:
        raise ValueError(f"tensor of {t.numel() * t.element_size()} bytes exceeds {MAX_TENSOR_BYTES}; chunk it")
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    data = lz4.block.compress(raw, store_size=False) if codec == "lz4" else raw
    return {"dtype": dtype, "shape": list(t.shape), "codec": codec, "data": data}


def decode_tensor(obj: Any, field: str = "tensor", wire: str | None = None) -> torch.Tensor:
    """The tensor a peer sent in ``obj``, or ProtocolError (BAD_TENSOR) naming what is wrong with it:
    no input raises anything else. ``wire``: the session's wire format, whose encodings alone are
    accepted (None: any known dtype and codec)."""
    def bad(why: str) -> ProtocolError:
        return ProtocolError(ErrorCode.BAD_TENSOR, f"{field}: {why}")

    if not isinstance(obj, dict):
        raise bad("expected a map with dtype, shape, codec, data")
    dtype, shape, codec, data = obj.get("dtype"), obj.get("shape"), obj.get("codec", "raw"), obj.get("data")
    if dtype not in WIRE_DTYPES:
        raise bad(f"dtype {dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    if codec not in CODECS:
        raise bad(f"codec {codec!r} is not one of {', '.join(CODECS)}")
    if wire is not None and (dtype, codec) not in WIRE_ENCODINGS[wire]:
        raise bad(f"{dtype} in codec {codec} is not what the session's wire format {wire} sends")
    if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_TENSOR_BYTES for d in shape)):
        raise bad(f"shape must be a list of at most {MAX_TENSOR_DIMS} ints in [0, {MAX_TENSOR_BYTES}], got {shape!r}")
    # Bounded as if its zero dimensions were ones: an empty tensor has 0 bytes whatever its other
    # dimensions, but torch still computes its strides, and [0, 24Mi, 24Mi, 24Mi] overflows them.
    if math.prod(max(d, 1) for d in shape) * _ITEM_BYTES[dtype] > MAX_TENSOR_BYTES:
        raise bad(f"shape {shape} exceeds the tensor limit of {MAX_TENSOR_BYTES} bytes, even where empty")
    if not isinstance(data, bytes):
        raise bad("data must be bytes")
    nbytes = math.prod(shape) * _ITEM_BYTES[dtype]
    if codec == "int8":
        try:
            return dequantize(data, shape, obj.get("block"), obj.get("outliers"), _TORCH[dtype])
        except ValueError as exc:
            raise bad(str(exc)) from None
    if codec == "lz4" and nbytes:
        try:
            data = lz4.block.decompress(data, uncompressed_size=nbytes)
        except Exception:
            raise bad("lz4 data does not decompress to the size its shape implies") from None
    if len(data) != nbytes:
        raise bad(f"shape {shape} of {dtype} needs {nbytes} bytes, got {len(data)}")
    if nbytes == 0:
        return torch.empty(shape, dtype=_TORCH[dtype])
    return torch.frombuffer(bytearray(data), dtype=_TORCH[dtype]).reshape(shape)
