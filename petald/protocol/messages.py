"""Message schemas: each message is a dataclass that checks every field it reads.

``to_wire`` gives the msgpack map; ``from_wire`` validates a received map and
raises ``ProtocolError`` naming the first bad field. docs/protocol.md lists them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from petald.protocol.errors import ErrorCode, ProtocolError
from petald.protocol.limits import (
    CODECS,
    MAX_BATCH,
    MAX_STRING,
    QUANT_MODES,
    WIRE_DTYPES,
    WIRE_VERSION,
)
from petald.protocol.tensors import decode_tensor, encode_tensor


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_MESSAGE, message)


def _int(msg: dict[str, Any], name: str, lo: int = 0, hi: int = 2**31) -> int:
    value = msg.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _bad(f"field {name!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _str(msg: dict[str, Any], name: str, choices: tuple[str, ...] | None = None) -> str:
    value = msg.get(name)
    if not isinstance(value, str) or len(value) > MAX_STRING:
        raise _bad(f"field {name!r} must be a string of at most {MAX_STRING} characters")
    if choices is not None and value not in choices:
        raise _bad(f"field {name!r} must be one of {', '.join(choices)}, got {value!r}")
    return value


def expect_type(msg: dict[str, Any], *types: str) -> str:
    if msg.get("type") not in types:
        raise _bad(f"expected a message of type {' or '.join(types)}, got {msg.get('type')!r}")
    return msg["type"]


@dataclass
class InfoRequest:
    def to_wire(self) -> dict[str, Any]:
        return {"type": "info"}


@dataclass
class ServerInfo:
    model_id: str
    fingerprint: str
    num_blocks: int
    start: int
    end: int
    dtype: str
    hidden_size: int
    max_length: int  # longest session this server admits
    free_cache_tokens: int
    version: str
    wire_version: int = WIRE_VERSION
    quant: str = "none"  # weight quantization: none, int8, int4, nf4 (absent from servers before it existed)

    def to_wire(self) -> dict[str, Any]:
        return {"type": "info", **self.__dict__}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> ServerInfo:
        expect_type(msg, "info")
        info = cls(
            model_id=_str(msg, "model_id"), fingerprint=_str(msg, "fingerprint"),
            num_blocks=_int(msg, "num_blocks", 1), start=_int(msg, "start"), end=_int(msg, "end", 1),
            dtype=_str(msg, "dtype"), hidden_size=_int(msg, "hidden_size", 1),
            max_length=_int(msg, "max_length", 1), free_cache_tokens=_int(msg, "free_cache_tokens", 0, 2**62),
            version=_str(msg, "version"), wire_version=_int(msg, "wire_version"),
            quant=_str(msg, "quant", QUANT_MODES) if "quant" in msg else "none",
        )
        if not info.start < info.end <= info.num_blocks:
            raise _bad(f"span {info.start}:{info.end} is not within {info.num_blocks} blocks")
        return info


@dataclass
class OpenSession:
    model_id: str
    fingerprint: str
    start: int
    end: int
    batch: int
    max_length: int
    wire_dtype: str = "float32"
    codec: str = "raw"
    wire_version: int = WIRE_VERSION

    def to_wire(self) -> dict[str, Any]:
        return {"type": "open", **self.__dict__}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> OpenSession:
        expect_type(msg, "open")
        version = _int(msg, "wire_version")
        if version != WIRE_VERSION:
            raise ProtocolError(ErrorCode.VERSION,
                                f"client speaks wire version {version}, this server speaks {WIRE_VERSION}")
        return cls(
            model_id=_str(msg, "model_id"), fingerprint=_str(msg, "fingerprint"),
            start=_int(msg, "start"), end=_int(msg, "end", 1), batch=_int(msg, "batch", 1, MAX_BATCH),
            max_length=_int(msg, "max_length", 1), wire_dtype=_str(msg, "wire_dtype", WIRE_DTYPES),
            codec=_str(msg, "codec", CODECS), wire_version=version,
        )


@dataclass
class SessionOpened:
    start: int
    end: int
    max_length: int

    def to_wire(self) -> dict[str, Any]:
        return {"type": "opened", **self.__dict__}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> SessionOpened:
        expect_type(msg, "opened")
        return cls(start=_int(msg, "start"), end=_int(msg, "end", 1), max_length=_int(msg, "max_length", 1))


@dataclass
class Step:
    """Hidden states [batch, tokens, hidden] for positions [position, position + tokens)."""

    step_id: int
    position: int
    hidden: torch.Tensor
    wire_dtype: str = "float32"
    codec: str = "raw"

    def to_wire(self) -> dict[str, Any]:
        return {"type": "step", "step_id": self.step_id, "position": self.position,
                "hidden": encode_tensor(self.hidden, self.wire_dtype, self.codec)}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Step:
        expect_type(msg, "step")
        return cls(step_id=_int(msg, "step_id"), position=_int(msg, "position"),
                   hidden=decode_tensor(msg.get("hidden"), "hidden"))


@dataclass
class StepOutput:
    step_id: int
    hidden: torch.Tensor
    wire_dtype: str = "float32"
    codec: str = "raw"

    def to_wire(self) -> dict[str, Any]:
        return {"type": "output", "step_id": self.step_id,
                "hidden": encode_tensor(self.hidden, self.wire_dtype, self.codec)}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> StepOutput:
        expect_type(msg, "output")
        return cls(step_id=_int(msg, "step_id"), hidden=decode_tensor(msg.get("hidden"), "hidden"))


@dataclass
class CloseSession:
    def to_wire(self) -> dict[str, Any]:
        return {"type": "close"}


@dataclass
class ErrorReply:
    code: str
    message: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code, "message": self.message[:MAX_STRING]}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> ErrorReply:
        expect_type(msg, "error")
        return cls(code=_str(msg, "code"), message=_str(msg, "message"))
