"""A private swarm's member list: the peer IDs its owner admits, signed by the owner's key.

The owner (an Ed25519 key, ``petald swarm-owner-key``) signs ``MemberList.to_bytes()``; the DHT
value is a ``SignedMemberList``: that payload, the owner's public key and the signature. The
p2pnode room signs and verifies (``swarm/membership.py``); this module only defines and bounds
the bytes, so that a list from a stranger is checked field by field before anything reads it.
A higher ``version`` replaces a lower one; ``issued_at`` says when the owner signed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

from petald.protocol.errors import ErrorCode, ProtocolError
from petald.protocol.messages import _bad, _int, _str, expect_type
from petald.protocol.signed_value import SignedValue

MAX_MEMBERS = 4096  # peer IDs in one list (~53 bytes each)
MAX_MEMBER_LIST_BYTES = 256 * 1024  # the whole signed value; the library's DHT records may be 1 MiB
MAX_PEER_ID_CHARS = 64  # an Ed25519 peer ID in base58 is 52


def _decode(data: bytes) -> dict[str, Any]:
    """A msgpack map with a string type, under limits that fit a member list (framing's
    ``decode_body`` allows arrays of 16 only)."""
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, max_array_len=MAX_MEMBERS, max_map_len=8,
                              max_ext_len=0, max_str_len=MAX_PEER_ID_CHARS * 4, max_bin_len=MAX_MEMBER_LIST_BYTES)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"a member list is not valid msgpack: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a member list is not a msgpack map with a string 'type'")
    return msg


@dataclass(frozen=True)
class MemberList:
    owner: str  # the owner's peer ID (base58), which its key must match
    version: int  # the newest version wins everywhere
    issued_at: float  # Unix time the owner signed it
    members: tuple[str, ...]  # peer IDs, sorted, without duplicates

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(sorted(set(self.members))))

    def to_bytes(self) -> bytes:
        return msgpack.packb({"type": "member_list", "owner": self.owner, "version": self.version,
                              "issued_at": self.issued_at, "members": list(self.members)}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> MemberList:
        msg = _decode(data)
        expect_type(msg, "member_list")
        issued = msg.get("issued_at")
        if isinstance(issued, bool) or not isinstance(issued, int | float) or not math.isfinite(issued) \
                or not 0 <= issued <= 1e11:
            raise _bad(f"field 'issued_at' must be a Unix time, got {issued!r}")
        members = msg.get("members")
        if not isinstance(members, list) or len(members) > MAX_MEMBERS \
                or not all(isinstance(m, str) and 0 < len(m) <= MAX_PEER_ID_CHARS for m in members):
            raise _bad(f"field 'members' must be a list of at most {MAX_MEMBERS} peer IDs")
        return cls(owner=_str(msg, "owner"), version=_int(msg, "version", 1, 2**62), issued_at=float(issued),
                    members=tuple(members))


class SignedMemberList(SignedValue):
    """The DHT value: ``payload`` is ``MemberList.to_bytes()``, signed by the owner's ``public_key``."""

    TYPE = "signed_member_list"
    WHAT = "member list"
    MAX_BYTES = MAX_MEMBER_LIST_BYTES
