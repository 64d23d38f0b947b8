"""Revocable membership of a private swarm: the owner's signed member list, kept in the DHT.

The owner's key (``petald swarm-owner-key``) signs a ``MemberList`` (peer IDs, a version, when it
was signed); nodes are told the owner's peer ID (``--swarm-owner``), which is its public key.
The list lives under ``/petald-members/<owner peer ID>``: every DHT node checks that the value is
signed by the key that ID names, and keeps the highest version, so any node may carry the list
but only the owner can change it. Servers refuse sessions of peers not on it and clients ignore
their records (docs/security.md, "Revocable membership").

How the list spreads. py-libp2p's DHT does not walk value lookups for keys like this one (it
ignores FIND_NODE for keys over 50 bytes that are not multihashes), so the list is handed from
peer to peer instead: ``SwarmMembership.refresh`` asks every DHT server this node knows (its
routing table) for the list, keeps the highest valid version, and stores it locally,
where the others' refreshes find it. Servers refresh every announce period; ``publish`` (the
owner's ``petald swarm-members``) stores a new version at every peer it knows. A node never goes
back to a lower version than one it has seen, so an old list replayed by a hostile DHT node
cannot re-admit a removed member.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import trio
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.records.validator import Validator

from petald.p2pnode.swarm.signed_values import MalformedValue, open_signed, sign_value
from petald.protocol.errors import ErrorCode, ProtocolError
from petald.protocol.member_list import MemberList, SignedMemberList

if TYPE_CHECKING:
    from petald.p2pnode.swarm.dht import SwarmDHT

log = logging.getLogger(__name__)

MEMBERS_NAMESPACE = "petald-members"
MAX_CLOCK_SKEW_S = 60.0  # a list signed further in the future than this is refused
ASK_TIMEOUT_S = 5.0  # one peer's answer to "your copy of the list?"


class InvalidMemberList(Exception):
    """A member list whose signature, owner or fields do not check out."""


def member_list_key(owner: str) -> str:
    return f"/{MEMBERS_NAMESPACE}/{owner}"


def parse_owner(text: str) -> str:
    """The owner's peer ID from ``--swarm-owner``: the ID itself, or a file that holds it (the
    ``.pub`` file ``petald swarm-owner-key`` writes); a ValueError says what is wrong."""
    from pathlib import Path

    value = text.strip()
    path = Path(value).expanduser()
    if path.is_file():
        raw = path.read_bytes()
        if len(raw) == 32 and not raw.isascii():
            raise ValueError(f"{path} is the owner's private key: give nodes the public part, {path}.pub, "
                             "or the owner ID it holds")
        value = raw.decode("ascii", "replace").strip()
    if not is_key_peer_id(value):
        raise ValueError(f"{text!r} is not an owner ID (a peer ID such as 12D3KooW..., as petald "
                         "swarm-owner-key prints) nor a file holding one")
    return value


def is_key_peer_id(text: str) -> bool:
    """Whether ``text`` is a peer ID that embeds its public key (Ed25519 ones do; a hashed one
    could not check a signature)."""
    try:
        return ID.from_base58(text).extract_public_key() is not None
    except Exception:
        return False


def sign_member_list(members: MemberList, owner_key: KeyPair) -> bytes:
    return sign_value(SignedMemberList, members.to_bytes(), owner_key).to_bytes()


def verify_member_list(data: bytes, owner: str, now: float | None = None) -> MemberList:
    """The list inside ``data`` if ``owner``'s key signed it and it names that owner."""
    now = time.time() if now is None else now
    try:
        payload, signer = open_signed(SignedMemberList, data)
        members = MemberList.from_bytes(payload)
    except (MalformedValue, ProtocolError) as exc:
        raise InvalidMemberList(f"malformed member list: {exc}") from None
    if signer is None or signer != members.owner or members.owner != owner:
        raise InvalidMemberList(f"a member list not signed by the owner {owner}")
    if members.issued_at > now + MAX_CLOCK_SKEW_S:
        raise InvalidMemberList("a member list issued in the future")
    return members


def _newest(values: Iterable[bytes], owner: str) -> tuple[MemberList, bytes] | None:
    best: tuple[MemberList, bytes] | None = None
    for value in values:
        try:
            members = verify_member_list(value, owner)
        except InvalidMemberList as exc:
            log.debug("dropped a member list: %s", exc)
            continue
        if best is None or (members.version, members.issued_at) > (best[0].version, best[0].issued_at):
            best = (members, value)
    return best


class MemberListValidator(Validator):
    """What every DHT node runs on ``/petald-members/...`` values before storing or returning them.
    ``members``: this node's own list, which takes a newer version of its owner's list at once (the
    owner's ``petald swarm-members`` stores it here; waiting for the next refresh would leave a
    newly added peer refused for up to a period)."""

    def __init__(self, members: SwarmMembership | None = None):
        self.members = members

    def validate(self, key: str, value: bytes) -> None:
        owner = key.removeprefix(f"/{MEMBERS_NAMESPACE}/")
        verify_member_list(value, owner)
        if self.members is not None and self.members.owner == owner:
            self.members.offer(value)

    def select(self, key: str, values: list[bytes]) -> int:
        newest = _newest(values, key.removeprefix(f"/{MEMBERS_NAMESPACE}/"))
        return values.index(newest[1]) if newest is not None else 0


class SwarmMembership:
    """The newest member list of ``owner`` this node has seen; who may use the swarm."""

    def __init__(self, owner: str):
        self.owner = owner
        self.current: MemberList | None = None
        self.signed: bytes | None = None
        self._removed: set[str] = set()  # peers newer lists dropped, until ``refresh`` hands them out

    def is_member(self, peer_id: str) -> bool:
        return self.current is not None and peer_id in self.current.members

    def refusal(self, peer_id: str) -> ProtocolError:
        """What a server answers a non-member."""
        if self.current is None:
            why = f"no member list signed by the swarm's owner {self.owner} has reached this server yet"
        else:
            why = (f"peer {peer_id} is not on the swarm owner's member list (version {self.current.version}); "
                   f"the owner adds it with petald swarm-members add {peer_id}")
        return ProtocolError(ErrorCode.NOT_MEMBER, why)

    def offer(self, data: bytes) -> bool:
        """Take ``data`` if it is a newer valid list; whether it did."""
        newest = _newest([data], self.owner)
        if newest is None:
            return False
        members, value = newest
        if self.current is not None and (members.version, members.issued_at) <= (self.current.version,
                                                                                  self.current.issued_at):
            return False
        if self.current is not None:
            self._removed |= set(self.current.members) - set(members.members)
        self._removed -= set(members.members)  # added back meanwhile
        self.current, self.signed = members, value
        log.info("member list version %d of owner ..%s: %d members", members.version, self.owner[-8:],
                 len(members.members))
        return True

    async def refresh(self, dht: SwarmDHT) -> set[str]:
        """Ask every peer this node knows for the list; keep the newest. Returns the peers removed."""
        key = member_list_key(self.owner).encode()
        kad = dht.kad
        local = kad.value_store.get(key)
        answers = [local.value] if local is not None else []

        async def ask(peer: ID) -> None:
            with trio.move_on_after(ASK_TIMEOUT_S):
                try:
                    answer = await kad.value_store._get_from_peer(peer, key, return_record=True)
                except Exception as exc:  # one silent peer does not spoil the refresh
                    log.debug("member list from %s failed: %s", peer, exc)
                    return
                if answer is not None and getattr(answer, "value", None):
                    answers.append(answer.value)

        async with trio.open_nursery() as nursery:
            for peer in _known_peers(dht):
                nursery.start_soon(ask, peer)
        for value in answers:
            self.offer(value)
        if self.signed is not None:
            kad.value_store.put(key, self.signed)  # where the others' refreshes find it
        removed, self._removed = self._removed, set()
        return removed

    async def publish(self, dht: SwarmDHT, signed: bytes) -> int:
        """Take ``signed`` (the owner's new list) and store it at every peer this node knows;
        returns how many took it."""
        self.offer(signed)
        key = member_list_key(self.owner).encode()
        dht.kad.value_store.put(key, signed)
        stored = 0

        async def store(peer: ID) -> None:
            nonlocal stored
            with trio.move_on_after(ASK_TIMEOUT_S):
                if await dht.kad.value_store._store_at_peer(peer, key, signed):
                    stored += 1

        async with trio.open_nursery() as nursery:
            for peer in _known_peers(dht):
                nursery.start_soon(store, peer)
        return stored

    async def keep_fresh(self, dht: SwarmDHT, period: float,
                         on_removed: Callable[[set[str]], Awaitable[None]]) -> None:
        """Refresh every ``period`` until cancelled; ``on_removed(peers)`` when a list drops some."""
        while True:
            try:
                removed = await self.refresh(dht)
                if removed:
                    await on_removed(removed)
            except Exception as exc:  # a failed round is retried next period
                log.warning("could not refresh the swarm's member list: %s", exc)
            await trio.sleep(period)


def _known_peers(dht: SwarmDHT) -> list[ID]:
    """The DHT servers in this node's routing table (a client node, which answers no DHT
    request, would hold each ask up for its whole timeout)."""
    me = dht.host.get_id()
    return [p for p in dht.kad.routing_table.get_peer_ids() if p != me]
