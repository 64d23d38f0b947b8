"""petald's view of libp2p's Kademlia DHT: our own protocol ID, signed server records, block lookup.

Keys in the DHT:

- ``/petald/<peer id>``: that server's ``SignedAnnouncement`` (one value per key, so one
  key per server; the validator keeps the newest record and refuses forged ones).
- sha256 of ``petald-block:<model id>:<block>``: provider records, one per server holding
  the block. (A multihash, so that every node answers FIND_NODE for it.)
- sha256 of ``petald-model:<model id>``: provider records, one per server of that model, so
  that a client finds a whole model's servers with one lookup instead of one per block
  (``model_announcements``; blocks it leaves uncovered are still looked up per block).
- sha256 of ``petald-servers``: provider records of every server, for the swarm map.
- ``/petald-members/<owner peer id>``: a private swarm's signed member list (``membership``).

py-libp2p 0.8 limits and how this module deals with them (docs/swarm.md has the list):

- ``KadDHT(protocol_prefix=...)`` is ignored: the library always speaks ``/ipfs/kad/1.0.0``.
  ``KadProtocolAdapter`` hands the DHT a view of the host in which that ID reads as
  ``/petald/kad/1.0.0``, so a petald swarm never mixes with IPFS.
- Provider records live 48 h and are republished every 22 h; a server that left is still
  listed. Its signed record expires within minutes, and lookups drop providers without a
  live record, so the fixed TTL does not matter.
- ``find_providers`` answers from the local store alone when it has any entry, even an
  incomplete one; ``providers_of`` always asks the closest peers too and merges the answers
  (duplicates removed).
- ``get_value`` likewise answers from a local copy, which an earlier lookup may have cached
  and which then never refreshes. py-libp2p also ignores FIND_NODE for keys longer than 50
  bytes that are not multihashes, which ``/petald/<peer id>`` is, so value lookups cannot
  iterate. ``announcement_of`` asks the record's own peer (it always holds its newest
  record) and the closest peers it knows, and keeps the newest valid answer.
- Every peer that opens a DHT stream is added to the routing table, client nodes included
  (which serve no DHT protocol), and then every PUT to such a client stalls for 10 s.
  ``SwarmKadDHT`` checks what the peer speaks (from identify) before adding it; a peer not
  identified yet reads as "no DHT" and is added on a later contact.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterable

import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.identity.identify_push.identify_push import push_identify_to_peers
from libp2p.kad_dht import KadDHT
from libp2p.kad_dht.kad_dht import DHTMode
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.tools.anyio_service import background_trio_service

from petald.p2pnode.swarm.dropped_records import DroppedRecords
from petald.p2pnode.swarm.kad_protocol import KadProtocolAdapter, check_library
from petald.p2pnode.swarm.membership import MEMBERS_NAMESPACE, MemberListValidator, SwarmMembership
from petald.p2pnode.swarm.signed_values import MalformedValue, open_signed, sign_value
from petald.p2pnode.transport.host import parse_peer_address
from petald.p2pnode.transport.private_network import swarm_key_hint
from petald.protocol.announcement import ServerAnnouncement, SignedAnnouncement
from petald.protocol.errors import ProtocolError

log = logging.getLogger(__name__)

RECORD_NAMESPACE = "petald"
MAX_CLOCK_SKEW_S = 60.0  # a record issued further in the future than this is refused
# One whole lookup (or provide, or record fetch). At 100 ms round trips a round of a lookup costs
# a dial (~0.5 s: TCP, Noise and yamux handshakes) and a DHT request (~0.2 s with its stream's
# negotiation): 10 s leaves room for the handful of rounds a swarm of thousands needs.
LOOKUP_TIMEOUT_S = 10.0
# How long a record is asked of its own server before its holders are asked, when that server is
# not connected yet. Dialling it may take a whole dial timeout (10 s) where its first known
# address does not answer (a NATed server's LAN address, seen from another network); its
# holders answer in a round trip or two. A dial and a request cost ~0.7 s at 100 ms round trips.
OWN_SERVER_FIRST_S = 3.0
# Lookups (and provides) a node runs at once. Each one opens a stream to every close peer,
# and the library resets inbound DHT streams beyond 12 at a time, so a node that fires 30
# lookups together mostly gets resets back.
CONCURRENT_LOOKUPS = 4


class InvalidAnnouncement(Exception):
    """A record whose signature, key, expiry or fields do not check out."""


def record_key(peer_id: str) -> str:
    return f"/{RECORD_NAMESPACE}/{peer_id}"


def _multihash(text: str) -> bytes:
    return bytes([0x12, 0x20]) + hashlib.sha256(text.encode()).digest()


def block_key(model_id: str, block: int) -> bytes:
    return _multihash(f"petald-block:{model_id}:{block}")


def model_key(model_id: str) -> bytes:
    return _multihash(f"petald-model:{model_id}")


SERVERS_KEY = _multihash("petald-servers")


# --- signing -------------------------------------------------------------------------------------

def sign_announcement(record: ServerAnnouncement, key_pair: KeyPair) -> SignedAnnouncement:
    return sign_value(SignedAnnouncement, record.to_bytes(), key_pair)


def verify_announcement(data: bytes, now: float | None = None,
                        expected_peer: str | None = None) -> ServerAnnouncement:
    """The record inside ``data`` if its key signed it, it names that key's peer ID, and it is live."""
    now = time.time() if now is None else now
    try:
        payload, signer = open_signed(SignedAnnouncement, data)
        record = ServerAnnouncement.from_bytes(payload)
    except (MalformedValue, ProtocolError, ValueError, TypeError) as exc:
        raise InvalidAnnouncement(f"malformed announcement: {exc}") from None
    if signer is None:
        raise InvalidAnnouncement(f"bad signature on the record of {record.peer_id}")
    if record.peer_id != signer:
        raise InvalidAnnouncement(f"record claims peer {record.peer_id} but is signed by {signer}")
    if expected_peer is not None and record.peer_id != expected_peer:
        raise InvalidAnnouncement(f"record of {record.peer_id} stored under {expected_peer}'s key")
    if record.expires_at <= now:
        raise InvalidAnnouncement(f"record of {record.peer_id} expired {now - record.expires_at:.0f} s ago")
    if record.issued_at > now + MAX_CLOCK_SKEW_S:
        raise InvalidAnnouncement(f"record of {record.peer_id} is issued in the future")
    return record


class AnnouncementValidator(Validator):
    """What every DHT node runs on ``/petald/...`` values before storing or returning them."""

    def validate(self, key: str, value: bytes) -> None:
        peer = key.removeprefix(f"/{RECORD_NAMESPACE}/")
        verify_announcement(value, expected_peer=peer)

    def select(self, key: str, values: list[bytes]) -> int:
        def issued(value: bytes) -> float:
            try:
                return ServerAnnouncement.from_bytes(SignedAnnouncement.from_bytes(value).payload).issued_at
            except ProtocolError:
                return float("-inf")
        return max(range(len(values)), key=lambda i: issued(values[i]))


class SwarmKadDHT(KadDHT):
    """The library's DHT, except that a peer joins the routing table only if it serves the DHT."""

    async def add_peer(self, peer_id: ID, *, skip_server_mode_check: bool = False) -> bool:
        return await self.routing_table.add_peer(peer_id, skip_server_mode_check=False)


# --- the DHT node --------------------------------------------------------------------------------

class SwarmDHT:
    """One node's DHT: join a swarm, publish this server's record, find the servers of blocks."""

    def __init__(self, host: IHost, key_pair: KeyPair, *, server_mode: bool, members: SwarmMembership | None = None):
        """``members``: a private swarm's member list (``membership``), fetched on ``join``; records
        of peers not on it are ignored by every lookup."""
        check_library()
        self.host, self.key_pair, self.members = host, key_pair, members
        validator = NamespacedValidator({RECORD_NAMESPACE: AnnouncementValidator(),
                                         MEMBERS_NAMESPACE: MemberListValidator(members)})
        mode = DHTMode.SERVER if server_mode else DHTMode.CLIENT
        self.kad = SwarmKadDHT(KadProtocolAdapter(host), mode, validator=validator,  # type: ignore[arg-type]
                               validator_changed=True)
        self.peer_id = host.get_id().to_base58()
        self._lookups = trio.CapacityLimiter(CONCURRENT_LOOKUPS)
        self._dropped = DroppedRecords()  # why invalid records were dropped, logged once each

    async def answer_queries(self, answer: bool) -> None:
        """Switch between server mode (answers other nodes' queries) and client mode (only asks).

        A server starts as a client and switches to server mode once others were found to
        dial it (server/reachability.py): had it answered from the start, its peers would
        have put it in their routing tables and handed it out in lookups, and everyone who
        then dials a NATed server's LAN address waits a whole query timeout for nothing.
        The peers connected to it learn of the change by an identify push (py-libp2p pushes
        only on new listen addresses) and add it to their tables on its next DHT contact.
        """
        if (self.kad.mode == DHTMode.SERVER) == answer:
            return
        known = self.kad.routing_table.get_peer_ids()
        await self.kad.switch_mode(DHTMode.SERVER if answer else DHTMode.CLIENT)
        for peer in known:  # the library empties the routing table on a switch to client mode
            await self.kad.routing_table.add_peer(peer, skip_server_mode_check=True)
        with trio.move_on_after(LOOKUP_TIMEOUT_S):
            await push_identify_to_peers(self.host)

    def stored_records(self) -> int:
        """Records this node holds for the swarm (its own and others')."""
        return len(self.kad.value_store.store)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SwarmDHT]:
        async with background_trio_service(self.kad):
            yield self

    async def join(self, initial_peers: Iterable[str], timeout: float = 15.0, refresh: bool = True) -> int:
        """Connect to the initial peers and fill the routing table; returns how many answered.

        ``refresh=False`` skips the filling (a lookup of this node's own ID and one per non-empty
        bucket: a dozen DHT streams, ~0.3 s on loopback): for a client node that only looks up
        its model's servers, whose lookups walk from the initial peers to the closest ones anyway.
        A node that reads the whole swarm map, or answers others' lookups, keeps it.
        """
        infos = [parse_peer_address(address) for address in initial_peers]
        joined = 0
        hints: list[str] = []  # what failed connections say about a private swarm's key

        async def connect(info: PeerInfo) -> None:
            nonlocal joined
            try:
                with trio.fail_after(timeout):
                    await self.host.connect(info)
            except Exception as exc:
                hint = swarm_key_hint(self.host, exc)
                if hint:
                    hints.append(hint)
                log.warning("initial peer %s did not answer: %s", info.peer_id, hint or exc)
                return
            # An initial peer is taken on trust: it is how we reach the swarm at all.
            await self.kad.routing_table.add_peer(info.peer_id, skip_server_mode_check=True)
            joined += 1

        async with trio.open_nursery() as nursery:
            for info in infos:
                nursery.start_soon(connect, info)
        if infos and joined == 0:
            raise ConnectionError("none of the initial peers answered: "
                                  + ", ".join(str(i.peer_id) for i in infos) + (f" ({hints[0]})" if hints else ""))
        if refresh:
            with trio.move_on_after(timeout):
                await self.kad.refresh_routing_table()
        if self.members is not None:
            await self.members.refresh(self)
        return joined

    async def publish(self, record: ServerAnnouncement, provide_keys: Iterable[bytes] = ()) -> None:
        """Store this server's signed record (and advertise it for ``provide_keys``)."""
        value = sign_announcement(record, self.key_pair).to_bytes()
        with trio.move_on_after(LOOKUP_TIMEOUT_S):
            await self.kad.put_value(record_key(self.peer_id), value)
        keys = list(provide_keys)
        if keys:
            async with trio.open_nursery() as nursery:
                for key in keys:
                    nursery.start_soon(self._provide, key)

    async def _provide(self, key: bytes) -> None:
        async with self._lookups:
            with trio.move_on_after(LOOKUP_TIMEOUT_S):
                await self.kad.provider_store.provide(key)

    async def providers_of(self, key: bytes) -> list[PeerInfo]:
        """Every provider the closest peers know of (and the local store), without duplicates."""
        store = self.kad.provider_store
        found = {p.peer_id: p for p in store.get_providers(key)}
        asked = {self.host.get_id()}

        async def ask(peer: ID) -> None:
            with trio.move_on_after(LOOKUP_TIMEOUT_S):
                try:
                    providers, _ = await store._get_providers_from_peer_with_closers(peer, key)
                except Exception as exc:  # one silent peer does not spoil the lookup
                    log.debug("providers of %s from %s failed: %s", key.hex(), peer, exc)
                    return
                for provider in providers:
                    found.setdefault(provider.peer_id, provider)

        async with trio.open_nursery() as nursery:
            def ask_each(peers: Iterable[ID]) -> None:
                for peer in peers:
                    if peer not in asked:
                        asked.add(peer)
                        nursery.start_soon(ask, peer)

            # The peers this node knows are asked at once, not only once the network lookup is
            # over: one peer in that lookup whose address does not answer holds it up for the
            # library's whole query timeout (10 s), and a lookup cut off by LOOKUP_TIMEOUT_S
            # returns nothing at all, not even the initial peers that held the answer.
            ask_each(self.kad.routing_table.find_local_closest_peers(key))
            with trio.move_on_after(LOOKUP_TIMEOUT_S):
                ask_each(await self.kad.peer_routing.find_closest_peers_network(key))
        return list(found.values())

    async def announcement_of(self, peer: ID) -> ServerAnnouncement | None:
        """The peer's newest live record, or None (absent, expired or forged).

        Asks the peer itself first: it holds its own newest record (the validator keeps the
        newest), so one answer from it settles the question. Only when it gives no valid record
        are the closest peers this node knows asked. The library's ``get_value`` is not used: it
        answers from a local copy when it has one, which may be stale. In a swarm with a member
        list, a peer not on it has no record here (none is asked for).
        """
        if self.members is not None and not self.members.is_member(peer.to_base58()):
            return None
        key = record_key(peer.to_base58())
        encoded = key.encode()
        local = self.kad.value_store.get(encoded)
        records = self._valid_records([local.value] if local is not None else [], peer)

        async def ask(holder: ID, timeout: float = LOOKUP_TIMEOUT_S) -> None:
            with trio.move_on_after(timeout):
                try:
                    answer = await self.kad.value_store._get_from_peer(holder, encoded, return_record=True)
                except Exception as exc:  # one silent peer does not spoil the lookup
                    log.debug("record of %s from %s failed: %s", peer, holder, exc)
                    return
                if answer is not None and getattr(answer, "value", None):
                    records.extend(self._valid_records([answer.value], peer))

        if peer != self.host.get_id():
            from_peer = len(records)
            connected = bool(self.host.get_network().get_connections(peer))
            await ask(peer, LOOKUP_TIMEOUT_S if connected else OWN_SERVER_FIRST_S)
            if len(records) > from_peer:
                return max(records, key=lambda r: r.issued_at)
        holders = dict.fromkeys(self.kad.routing_table.find_local_closest_peers(encoded))
        async with trio.open_nursery() as nursery:
            for holder in holders:
                if holder not in (peer, self.host.get_id()):
                    nursery.start_soon(ask, holder)
        return max(records, key=lambda r: r.issued_at, default=None)

    def _valid_records(self, values: list[bytes], peer: ID) -> list[ServerAnnouncement]:
        records = []
        for value in values:
            try:
                records.append(verify_announcement(value, expected_peer=peer.to_base58()))
            except InvalidAnnouncement as exc:
                self._dropped.drop(value, exc)
        return records

    async def announcements(self, keys: Iterable[bytes]) -> list[ServerAnnouncement]:
        """The live records of every server that provides any of ``keys``."""
        peers: dict[ID, PeerInfo] = {}

        async def collect(key: bytes) -> None:
            async with self._lookups:
                found = await self.providers_of(key)
            for info in found:
                peers.setdefault(info.peer_id, info)

        async with trio.open_nursery() as nursery:
            for key in set(keys):
                nursery.start_soon(collect, key)
        records: list[ServerAnnouncement] = []

        async def fetch(info: PeerInfo) -> None:
            if info.addrs:
                self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 600)
            async with self._lookups:
                record = await self.announcement_of(info.peer_id)
            if record is not None:
                records.append(record)

        async with trio.open_nursery() as nursery:
            for info in peers.values():
                nursery.start_soon(fetch, info)
        return sorted(records, key=lambda r: r.peer_id)

    async def model_announcements(self, model_id: str, num_blocks: int) -> list[ServerAnnouncement]:
        """The live records of ``model_id``'s servers (and of any other server found on the way).

        One lookup of the model's key finds every server that provides it; only the blocks that
        no online record of the model covers are then looked up one by one (a server that does
        not provide the model key, or whose provider record was lost on the way).
        """
        records = {r.peer_id: r for r in await self.announcements([model_key(model_id)])}
        covered = {b for r in records.values() if r.model_id == model_id and r.state == "online"
                   for b in range(r.start, r.end)}
        missing = [block_key(model_id, b) for b in range(num_blocks) if b not in covered]
        if missing:
            for record in await self.announcements(missing):
                records.setdefault(record.peer_id, record)
        return sorted(records.values(), key=lambda r: r.peer_id)
