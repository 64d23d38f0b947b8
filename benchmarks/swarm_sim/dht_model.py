"""The DHT at scale: py-libp2p's own RoutingTable and iterative lookup, run in-process.

Every node gets a py-libp2p ``RoutingTable`` holding what a Kademlia node learns by joining
(its own-ID lookup and one refresh per bucket): up to k peers for every length of prefix it
shares with them. Tables are built when a lookup first asks that node. A lookup is the library's
own ``PeerRouting.find_closest_peers_network``; only the network call is replaced, by a query of
the asked node's table that takes one round trip of a mock clock, so the lookup's rounds (its
hops: sequential round trips) are the virtual time it takes. py-libp2p 0.8 splits any full bucket,
so a real table may hold more peers than k per prefix length: the hops measured are an upper bound.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import trio
import trio.testing
from libp2p.kad_dht.common import BUCKET_SIZE
from libp2p.kad_dht.peer_routing import PeerRouting
from libp2p.kad_dht.routing_table import RoutingTable
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo


class _NoNetwork:
    """What PeerRouting asks of its host beyond the table: nothing is connected outside it."""

    def __init__(self, peer: ID):
        self.peer = peer

    def get_id(self) -> ID:
        return self.peer

    def get_connected_peers(self) -> list[ID]:
        return []

    def get_peerstore(self) -> _NoNetwork:
        return self

    def peer_ids(self) -> list[ID]:
        return []


class _InProcessRouting(PeerRouting):
    """The library's lookup, whose FIND_NODE is answered by the asked node's own table."""

    def __init__(self, dht: DhtModel, origin: int, table: RoutingTable):
        super().__init__(_NoNetwork(dht.ids[origin]), table)  # type: ignore[arg-type]
        self.dht = dht

    async def _query_peer_for_closest(self, peer: ID, target_key: bytes) -> list[ID]:
        self.dht.queries += 1
        await trio.sleep(1.0)  # one round trip
        table = await self.dht.table(self.dht.index[peer])
        return table.find_local_closest_peers(target_key, BUCKET_SIZE)


@dataclass(frozen=True)
class LookupStats:
    nodes: int
    lookups: int
    hops_mean: float
    hops_p95: float
    hops_max: int
    queries_mean: float  # FIND_NODE requests per lookup
    found_closest_share: float  # of the true k closest, the share a lookup returned
    table_size_mean: float
    seconds: float


class DhtModel:
    def __init__(self, nodes: int, rng: np.random.Generator):
        self.rng = rng
        # Ed25519 peer IDs: an identity multihash of the protobuf-wrapped public key.
        self.ids = [ID(bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20]) + rng.bytes(32)) for _ in range(nodes)]
        self.index = {peer: i for i, peer in enumerate(self.ids)}
        keys = [hashlib.sha256(peer.to_bytes()).digest() for peer in self.ids]
        self.keys = keys
        self.top64 = np.array([int.from_bytes(k[:8], "big") for k in keys], dtype=np.uint64)
        self._tables: dict[int, RoutingTable] = {}
        self.queries = 0

    def _known_peers(self, node: int) -> list[int]:
        """Up to k peers for each length of shared prefix (what joining teaches a node)."""
        xor = self.top64 ^ self.top64[node]
        # Leading zeros of the 64-bit xor = shared prefix length (64: shares the whole top; rare).
        shared = np.where(xor == 0, 64, 63 - np.floor(np.log2(np.maximum(xor, 1).astype(np.float64))).astype(int))
        shared[node] = -1
        known: list[int] = []
        for length in np.unique(shared[shared >= 0]):
            members = np.flatnonzero(shared == length)
            take = members if len(members) <= BUCKET_SIZE else self.rng.choice(members, BUCKET_SIZE, replace=False)
            known.extend(int(m) for m in take)
        return known

    async def table(self, node: int) -> RoutingTable:
        table = self._tables.get(node)
        if table is None:
            table = RoutingTable(self.ids[node], _NoNetwork(self.ids[node]))  # type: ignore[arg-type]
            for peer in self.rng.permutation(self._known_peers(node)):
                # An uncontended lock; with the buckets split up to 256 it never pings anyone.
                await table.add_peer(PeerInfo(self.ids[int(peer)], []), skip_server_mode_check=True)
            self._tables[node] = table
        return table

    def true_closest(self, target: bytes, count: int = BUCKET_SIZE) -> set[ID]:
        hashed = int.from_bytes(hashlib.sha256(target).digest(), "big")
        distances = [int.from_bytes(k, "big") ^ hashed for k in self.keys]
        return {self.ids[i] for i in np.argsort(np.array(distances, dtype=object))[:count]}

    def measure(self, lookups: int) -> LookupStats:
        started = time.perf_counter()
        hops: list[int] = []
        queries: list[int] = []
        found: list[float] = []

        async def run() -> None:
            for _ in range(lookups):
                origin = int(self.rng.integers(len(self.ids)))
                target = self.rng.bytes(32)
                routing = _InProcessRouting(self, origin, await self.table(origin))
                before, asked = trio.current_time(), self.queries
                result = await routing.find_closest_peers_network(target)
                hops.append(round(trio.current_time() - before))
                queries.append(self.queries - asked)
                truth = self.true_closest(target)
                found.append(len(truth & set(result)) / len(truth))

        trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
        sizes = [t.size() for t in self._tables.values()]
        return LookupStats(len(self.ids), lookups, float(np.mean(hops)), float(np.percentile(hops, 95)), max(hops),
                           float(np.mean(queries)), float(np.mean(found)), float(np.mean(sizes)),
                           time.perf_counter() - started)

