"""A DHT value some key signed: the payload, the signer's public key and the signature.

Two kinds travel in the DHT, each a subclass that names its type and bounds its size: a server's
record (``announcement.SignedAnnouncement``) and a private swarm's member list
(``member_list.SignedMemberList``). The p2pnode room signs and verifies (it owns the keys); this
module only defines and bounds the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

import msgpack

from petald.protocol.framing import decode_body
from petald.protocol.messages import _bad, expect_type


@dataclass(frozen=True)
class SignedValue:
    payload: bytes
    public_key: bytes  # libp2p's protobuf-serialised public key
    signature: bytes

    TYPE: ClassVar[str]  # the msgpack map's type
    WHAT: ClassVar[str]  # what it is called in errors
    MAX_BYTES: ClassVar[int]  # a larger value is refused, encoded or decoded

    def to_bytes(self) -> bytes:
        data = msgpack.packb({"type": self.TYPE, "payload": self.payload, "public_key": self.public_key,
                              "signature": self.signature}, use_bin_type=True)
        if len(data) > self.MAX_BYTES:
            raise _bad(f"{self.WHAT} of {len(data)} bytes exceeds {self.MAX_BYTES}")
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        if len(data) > cls.MAX_BYTES:
            raise _bad(f"{cls.WHAT} of {len(data)} bytes exceeds {cls.MAX_BYTES}")
        msg = decode_body(data)
        expect_type(msg, cls.TYPE)
        parts = {}
        for name in ("payload", "public_key", "signature"):
            value = msg.get(name)
            if not isinstance(value, bytes):
                raise _bad(f"field {name!r} must be bytes")
            parts[name] = value
        return cls(**parts)
