"""The swarm as a map: every model, every block, who serves it, and which blocks nobody serves."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.peer.id import ID

from petald.p2pnode.swarm.dht import CONCURRENT_LOOKUPS, LOOKUP_TIMEOUT_S, SERVERS_KEY, SwarmDHT
from petald.protocol.announcement import ServerAnnouncement

SERVING_STATES = ("online",)


@dataclass(frozen=True)
class ModelMap:
    model_id: str
    num_blocks: int
    servers: list[ServerAnnouncement]

    def servers_of(self, block: int) -> list[ServerAnnouncement]:
        return [s for s in self.servers if s.serves(block) and s.state in SERVING_STATES]

    @property
    def uncovered(self) -> list[int]:
        return [b for b in range(self.num_blocks) if not self.servers_of(b)]

    def block_throughput(self, block: int) -> float:
        return sum(s.inference_rps for s in self.servers_of(block))

    def to_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "num_blocks": self.num_blocks,
            "uncovered_blocks": self.uncovered,
            "servers": [{"peer_id": s.peer_id, "start": s.start, "end": s.end, "state": s.state,
                         "inference_rps": round(s.inference_rps, 1), "forward_tps": round(s.forward_tps, 1),
                         "free_cache_tokens": s.free_cache_tokens, "dtype": s.dtype, "quant": s.quant,
                         "version": s.version, "addresses": s.addresses, "expires_at": s.expires_at,
                         "adapters": s.adapters}
                        for s in self.servers],
            "blocks": [{"block": b, "servers": [s.peer_id for s in self.servers_of(b)],
                        "inference_rps": round(self.block_throughput(b), 1)} for b in range(self.num_blocks)],
        }


async def read_swarm(dht: SwarmDHT, rounds: int = 2) -> list[ModelMap]:
    """Every live record reachable from this node, grouped by model (fingerprint included).

    A lookup can miss a server when close peers are busy (they reset DHT streams beyond a
    dozen at a time), so the map is the union of ``rounds`` lookups, a second apart.
    """
    records: dict[str, ServerAnnouncement] = {}
    for round_ in range(rounds):
        if round_:
            await trio.sleep(1.0)
        for record in await _read_once(dht):
            known = records.get(record.peer_id)
            if known is None or record.issued_at > known.issued_at:
                records[record.peer_id] = record
    by_model: dict[tuple[str, int], list[ServerAnnouncement]] = defaultdict(list)
    for record in records.values():
        by_model[(record.model_id, record.num_blocks)].append(record)
    return [ModelMap(model_id, num_blocks, sorted(servers, key=lambda s: (s.start, s.end, s.peer_id)))
            for (model_id, num_blocks), servers in sorted(by_model.items())]


async def _read_once(dht: SwarmDHT) -> list[ServerAnnouncement]:
    records = {r.peer_id: r for r in await dht.announcements([SERVERS_KEY])}
    # Every server is also a DHT server: one missing from the index (its provider record
    # not yet republished, or dropped by a rate limit) is found among the DHT's peers.
    peers = set(dht.kad.routing_table.get_peer_ids())
    with trio.move_on_after(LOOKUP_TIMEOUT_S):
        peers.update(await dht.kad.peer_routing.find_closest_peers_network(os.urandom(32)))
    limit = trio.CapacityLimiter(CONCURRENT_LOOKUPS)

    async def fetch(peer: ID) -> None:
        async with limit:
            record = await dht.announcement_of(peer)
        if record is not None:
            records[record.peer_id] = record

    async with trio.open_nursery() as nursery:
        for peer in peers:
            if peer.to_base58() not in records and peer.to_base58() != dht.peer_id:
                nursery.start_soon(fetch, peer)
    return list(records.values())
