"""What a server tells the swarm about itself, and the signed envelope it travels in.

A server puts one ``ServerAnnouncement`` into the DHT under its own peer ID,
wrapped in a ``SignedAnnouncement``: the msgpack payload, the server's public
key and a signature over the payload. The p2pnode room signs and verifies
(it owns the keys); this module only defines and bounds the bytes, so that a
record from a stranger is checked field by field before anything reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack

from petald.protocol.framing import decode_body
from petald.protocol.limits import MAX_RECORD_LIFETIME_S, WIRE_VERSION
from petald.protocol.messages import _bad, _int, _str, _str_list, expect_type
from petald.protocol.signed_value import SignedValue
from petald.vocabulary import QUANT_MODES

SERVER_STATES = ("joining", "online", "offline")
MAX_ANNOUNCEMENT_BYTES = 16 * 1024  # a record is a few hundred bytes; a DHT value this size is refused


def _float(msg: dict[str, Any], name: str, lo: float = 0.0, hi: float = 1e12) -> float:
    value = msg.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise _bad(f"field {name!r} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ServerAnnouncement:
    """One server's state. Throughputs are per block, so that spans of any length compare."""

    peer_id: str
    addresses: list[str]
    state: str
    model_id: str
    fingerprint: str
    num_blocks: int
    start: int
    end: int
    dtype: str
    quant: str
    max_length: int  # longest session it admits
    free_cache_tokens: int
    inference_rps: float  # single-token decode steps per second through ONE of its blocks
    forward_tps: float  # prefill/forward tokens per second through ONE of its blocks
    network_mbps: float  # 0 when unknown
    issued_at: float  # unix time; the newest record of a peer wins
    expires_at: float
    version: str
    wire_version: int = WIRE_VERSION
    adapters: list[str] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        return {"type": "announcement", **self.__dict__}

    def to_bytes(self) -> bytes:
        return msgpack.packb(self.to_wire(), use_bin_type=True)

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> ServerAnnouncement:
        expect_type(msg, "announcement")
        record = cls(
            peer_id=_str(msg, "peer_id"), addresses=_str_list(msg, "addresses"),
            state=_str(msg, "state", SERVER_STATES), model_id=_str(msg, "model_id"),
            fingerprint=_str(msg, "fingerprint"), num_blocks=_int(msg, "num_blocks", 1, 100_000),
            start=_int(msg, "start"), end=_int(msg, "end", 1), dtype=_str(msg, "dtype"),
            quant=_str(msg, "quant", QUANT_MODES), max_length=_int(msg, "max_length", 1),
            free_cache_tokens=_int(msg, "free_cache_tokens", 0, 2**62),
            inference_rps=_float(msg, "inference_rps"), forward_tps=_float(msg, "forward_tps"),
            network_mbps=_float(msg, "network_mbps"), issued_at=_float(msg, "issued_at"),
            expires_at=_float(msg, "expires_at"), version=_str(msg, "version"),
            wire_version=_int(msg, "wire_version"), adapters=_str_list(msg, "adapters"),
        )
        if not record.start < record.end <= record.num_blocks:
            raise _bad(f"span {record.start}:{record.end} is not within {record.num_blocks} blocks")
        if record.expires_at < record.issued_at:
            raise _bad("the record expires before it was issued")
        if record.expires_at - record.issued_at > MAX_RECORD_LIFETIME_S:
            raise _bad(f"the record lives {record.expires_at - record.issued_at:.0f} s; "
                       f"at most {MAX_RECORD_LIFETIME_S:.0f} s after it was issued")
        return record

    @classmethod
    def from_bytes(cls, data: bytes) -> ServerAnnouncement:
        return cls.from_wire(decode_body(data))

    def serves(self, block: int) -> bool:
        return self.start <= block < self.end


class SignedAnnouncement(SignedValue):
    """The DHT value: ``payload`` is ``ServerAnnouncement.to_bytes()``, signed by ``public_key``."""

    TYPE = "signed_announcement"
    WHAT = "announcement"
    MAX_BYTES = MAX_ANNOUNCEMENT_BYTES
