"""Signing and opening the DHT's signed values (``protocol/signed_value.py``): a server's record
and a private swarm's member list are signed and checked the same way."""

from __future__ import annotations

from typing import TypeVar

from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID

from petald.protocol.errors import ProtocolError
from petald.protocol.signed_value import SignedValue

S = TypeVar("S", bound=SignedValue)


class MalformedValue(Exception):
    """Bytes that are not a signed value of the kind asked for, or whose key is not a key."""


def sign_value(kind: type[S], payload: bytes, key_pair: KeyPair) -> S:
    return kind(payload, key_pair.public_key.serialize(), key_pair.private_key.sign(payload))


def open_signed(kind: type[SignedValue], data: bytes) -> tuple[bytes, str | None]:
    """The payload inside ``data`` and the peer ID of the key that signed it (None: the signature
    does not check out)."""
    try:
        signed = kind.from_bytes(data)
    except ProtocolError as exc:
        raise MalformedValue(str(exc)) from None
    try:
        public_key = deserialize_public_key(signed.public_key)
    except Exception as exc:  # protobuf and key parsing raise their own types
        raise MalformedValue(f"malformed public key: {exc}") from None
    try:
        signed_ok = public_key.verify(signed.payload, signed.signature)
    except Exception:
        signed_ok = False
    return signed.payload, ID.from_pubkey(public_key).to_base58() if signed_ok else None
