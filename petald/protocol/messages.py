"""Message schemas: each message is a dataclass that checks every field it reads.

``to_wire`` gives the msgpack map; ``from_wire`` validates a received map and
raises ``ProtocolError`` naming the first bad field. docs/protocol.md lists them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from petald.protocol.errors import ErrorCode, ProtocolError
from petald.protocol.limits import (
    MAX_ARRAY_LEN,
    MAX_BATCH,
    MAX_STRING,
    PUSH_TOKEN_BYTES,
    WIRE_FORMATS,
    WIRE_VERSION,
)
from petald.protocol.tensors import decode_tensor, encode_wire
from petald.vocabulary import QUANT_MODES


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


def _str_list(msg: dict[str, Any], name: str) -> list[str]:
    value = msg.get(name)
    if not isinstance(value, list) or len(value) > MAX_ARRAY_LEN \
            or not all(isinstance(v, str) and len(v) <= MAX_STRING for v in value):
        raise _bad(f"field {name!r} must be a list of at most {MAX_ARRAY_LEN} strings")
    return list(value)


def _duration_ms(msg: dict[str, Any], name: str) -> float:
    value = msg.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and value >= 0):
        raise _bad(f"field {name!r} must be a finite number of milliseconds >= 0, got {value!r}")
    return float(value)


def _token(msg: dict[str, Any], name: str) -> bytes:
    value = msg.get(name)
    if not isinstance(value, bytes) or len(value) != PUSH_TOKEN_BYTES:
        raise _bad(f"field {name!r} must be {PUSH_TOKEN_BYTES} bytes")
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
    adapters: list[str] = field(default_factory=list)  # names of the LoRA adapters it can apply
    # Its whole KV budget, tokens summed over blocks (0: unknown, servers before it existed): a
    # session that needs more can never be admitted there, and the client says so at once.
    cache_capacity_tokens: int = 0

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
            adapters=_str_list(msg, "adapters") if "adapters" in msg else [],
            cache_capacity_tokens=_int(msg, "cache_capacity_tokens", 0, 2**62) if "cache_capacity_tokens" in msg else 0,
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
    wire: str = "float32"  # how the server sends this session's outputs, to the client and pushed (WIRE_FORMATS)
    wire_version: int = WIRE_VERSION
    adapter: str = ""  # the LoRA adapter to apply, by name; "" for none
    # Given, servers that know it may push this session's steps to it (PUSH_PROTOCOL); b"" for none.
    push_token: bytes = b""

    def to_wire(self) -> dict[str, Any]:
        msg = {"type": "open", **self.__dict__}
        if not self.push_token:
            del msg["push_token"]
        return msg

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
            max_length=_int(msg, "max_length", 1), wire=_str(msg, "wire", WIRE_FORMATS), wire_version=version,
            adapter=_str(msg, "adapter") if "adapter" in msg else "",
            push_token=_token(msg, "push_token") if "push_token" in msg else b"",
        )


@dataclass
class PushTarget:
    """Where a server sends a step's output: the next server's session, as its step ``step_id``.

    No address: the pushing server reaches the peer only by what it knows itself (a connection,
    or addresses learned from the swarm), so a client cannot make it dial anywhere else."""

    peer_id: str
    token: bytes  # that session's push token
    step_id: int
    wire: str = ""  # how to send the step over this server-to-server hop (WIRE_FORMATS); "": the session's own

    def to_wire(self) -> dict[str, Any]:
        msg = {"peer_id": self.peer_id, "token": self.token, "step_id": self.step_id}
        if self.wire:
            msg["wire"] = self.wire
        return msg

    @classmethod
    def from_wire(cls, msg: Any) -> PushTarget:
        if not isinstance(msg, dict):
            raise _bad("a push target must be a map")
        return cls(peer_id=_str(msg, "peer_id"), token=_token(msg, "token"), step_id=_int(msg, "step_id"),
                   wire=_str(msg, "wire", WIRE_FORMATS) if "wire" in msg else "")


@dataclass
class PushOpen:
    """The first message of a push stream: the session the pushed steps are for."""

    token: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"type": "push_open", "token": self.token}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> PushOpen:
        expect_type(msg, "push_open")
        return cls(token=_token(msg, "token"))


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
    """Hidden states [batch, tokens, hidden] for positions [position, position + tokens).

    ``prompts`` [blocks, 1 or batch, n, hidden], when present, is added to the step's first n
    tokens before each block of the session's span (deep prompts, sent with the steps that
    cover the prompt's positions).

    ``push`` names the sessions of the next servers of the route, in order: the output goes to the
    first, which passes it on to the rest (docs/protocol.md, "Pushing steps")."""

    step_id: int
    position: int
    hidden: torch.Tensor
    wire: str = "float32"  # how to encode it (WIRE_FORMATS): each tensor says what it is, decoding needs no wire
    prompts: torch.Tensor | None = None
    push: list[PushTarget] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        msg = {"type": "step", "step_id": self.step_id, "position": self.position,
               "hidden": encode_wire(self.hidden, self.wire)}
        if self.prompts is not None:
            msg["prompts"] = encode_wire(self.prompts, self.wire)
        if self.push:
            msg["push"] = [target.to_wire() for target in self.push]
        return msg

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Step:
        expect_type(msg, "step")
        prompts = msg.get("prompts")
        push = msg.get("push", [])
        if not isinstance(push, list) or len(push) > MAX_ARRAY_LEN:
            raise _bad(f"field 'push' must be a list of at most {MAX_ARRAY_LEN} push targets")
        return cls(step_id=_int(msg, "step_id"), position=_int(msg, "position"),
                   hidden=decode_tensor(msg.get("hidden"), "hidden"),
                   prompts=decode_tensor(prompts, "prompts") if prompts is not None else None,
                   push=[PushTarget.from_wire(target) for target in push])


@dataclass
class StepOutput:
    step_id: int
    hidden: torch.Tensor
    wire: str = "float32"
    pushed: bool = False  # the output was also handed to the next server (the step's first push target)
    # How long the server held the step, from received to its answer ready to send (None: not said):
    # what the client takes off the step's time to measure its link (client/link_bandwidth.py).
    held_ms: float | None = None

    def to_wire(self) -> dict[str, Any]:
        msg = {"type": "output", "step_id": self.step_id, "hidden": encode_wire(self.hidden, self.wire)}
        if self.pushed:
            msg["pushed"] = True
        if self.held_ms is not None:
            msg["held_ms"] = self.held_ms
        return msg

    @classmethod
    def from_wire(cls, msg: dict[str, Any], wire: str | None = None) -> StepOutput:
        """``wire``: the session's wire format, the only one its outputs may come in (None: any)."""
        expect_type(msg, "output")
        pushed = msg.get("pushed", False)
        if not isinstance(pushed, bool):
            raise _bad("field 'pushed' must be a boolean")
        return cls(step_id=_int(msg, "step_id"), hidden=decode_tensor(msg.get("hidden"), "hidden", wire),
                   wire=wire or "float32", pushed=pushed,
                   held_ms=_duration_ms(msg, "held_ms") if "held_ms" in msg else None)


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


@dataclass
class SpanRequest:
    """A training request on ``/petald/training``: run whole sequences ``hidden`` [batch, tokens, hidden]
    (positions 0..tokens-1) through blocks [start, end), forward, or backward given ``grad_output``.

    ``prompts`` [blocks, 1 or batch, prompt tokens, hidden] are deep prompts added to the first
    positions before each block. Nothing is kept between requests: a backward recomputes the forward.
    """

    model_id: str
    fingerprint: str
    start: int
    end: int
    hidden: torch.Tensor
    grad_output: torch.Tensor | None = None  # given: a backward request
    prompts: torch.Tensor | None = None
    adapter: str = ""
    wire: str = "float32"  # how both sides send tensors (WIRE_FORMATS)
    wire_version: int = WIRE_VERSION

    @property
    def backward(self) -> bool:
        return self.grad_output is not None

    def to_wire(self) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "type": "backward" if self.backward else "forward", "model_id": self.model_id,
            "fingerprint": self.fingerprint, "start": self.start, "end": self.end, "adapter": self.adapter,
            "wire": self.wire, "wire_version": self.wire_version, "hidden": encode_wire(self.hidden, self.wire)}
        if self.grad_output is not None:
            msg["grad_output"] = encode_wire(self.grad_output, self.wire)
        if self.prompts is not None:
            msg["prompts"] = encode_wire(self.prompts, self.wire)
        return msg

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> SpanRequest:
        kind = expect_type(msg, "forward", "backward")
        version = _int(msg, "wire_version")
        if version != WIRE_VERSION:
            raise ProtocolError(ErrorCode.VERSION,
                                f"client speaks wire version {version}, this server speaks {WIRE_VERSION}")
        return cls(
            model_id=_str(msg, "model_id"), fingerprint=_str(msg, "fingerprint"),
            start=_int(msg, "start"), end=_int(msg, "end", 1), hidden=decode_tensor(msg.get("hidden"), "hidden"),
            grad_output=decode_tensor(msg.get("grad_output"), "grad_output") if kind == "backward" else None,
            prompts=decode_tensor(msg["prompts"], "prompts") if msg.get("prompts") is not None else None,
            adapter=_str(msg, "adapter"), wire=_str(msg, "wire", WIRE_FORMATS), wire_version=version,
        )


@dataclass
class SpanOutput:
    """The answer to a ``SpanRequest``: a forward's outputs, or a backward's gradients with respect to
    its ``hidden`` (and to its ``prompts``, when it sent any)."""

    tensor: torch.Tensor  # the outputs, or the gradient of hidden
    grad_prompts: torch.Tensor | None = None
    backward: bool = False
    wire: str = "float32"

    def to_wire(self) -> dict[str, Any]:
        if not self.backward:
            return {"type": "forward_output", "hidden": encode_wire(self.tensor, self.wire)}
        msg = {"type": "backward_output", "grad_hidden": encode_wire(self.tensor, self.wire)}
        if self.grad_prompts is not None:
            msg["grad_prompts"] = encode_wire(self.grad_prompts, self.wire)
        return msg

    @classmethod
    def from_wire(cls, msg: dict[str, Any], wire: str | None = None) -> SpanOutput:
        """``wire``: the request's wire format, the only one the answer may come in (None: any)."""
        if expect_type(msg, "forward_output", "backward_output") == "forward_output":
            return cls(decode_tensor(msg.get("hidden"), "hidden", wire), wire=wire or "float32")
        grad_prompts = msg.get("grad_prompts")
        return cls(decode_tensor(msg.get("grad_hidden"), "grad_hidden", wire),
                   decode_tensor(grad_prompts, "grad_prompts", wire) if grad_prompts is not None else None,
                   backward=True, wire=wire or "float32")
