"""Which servers run which blocks: the chain of hops that should answer a step soonest.

A hop costs its round trip plus its blocks' compute (blocks / announced steps per second
per block) plus a small constant, so that among equals the route with fewer hops wins.
Servers without figures (peers given directly) cost the constant alone: fewest hops.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from petald.protocol.messages import ServerInfo

HOP_OVERHEAD_S = 1e-3  # serialisation and scheduling of one more hop


class NoRouteError(Exception):
    """No chain of known servers covers the blocks asked for."""


@dataclass(frozen=True)
class RemoteServer:
    peer_id: str
    address: str
    info: ServerInfo
    rtt: float = 0.0  # seconds, measured by the client
    inference_rps: float = 0.0  # announced decode steps per second per block; 0 when unknown

    def hop_cost(self, blocks: int) -> float:
        compute = blocks / self.inference_rps if self.inference_rps > 0 else 0.0
        return HOP_OVERHEAD_S + self.rtt + compute


@dataclass(frozen=True)
class SpanHop:
    server: RemoteServer
    start: int
    end: int


@dataclass(frozen=True)
class SpanRoute:
    hops: tuple[SpanHop, ...]

    @classmethod
    def plan(cls, servers: list[RemoteServer], start: int, end: int,
             split_after: frozenset[int] = frozenset(), cache_tokens_per_block: int = 0) -> SpanRoute:
        """The cheapest chain covering [start, end) (Dijkstra over block positions).

        ``split_after`` forces a hop boundary after those blocks (to read hidden states there);
        ``cache_tokens_per_block`` skips servers without that much free cache per block served.
        """
        cuts = sorted(b + 1 for b in split_after if start <= b < end - 1)
        best: dict[int, float] = {start: 0.0}
        came_from: dict[int, SpanHop] = {}
        queue = [(0.0, start)]
        while queue:
            cost, position = heapq.heappop(queue)
            if position == end:
                break
            if cost > best.get(position, float("inf")):
                continue
            limit = min([c for c in cuts if c > position] + [end])
            for server in servers:
                if not server.info.start <= position < server.info.end:
                    continue
                for stop in range(position + 1, min(server.info.end, limit) + 1):
                    if server.info.free_cache_tokens < cache_tokens_per_block * (stop - position):
                        break
                    total = cost + server.hop_cost(stop - position)
                    if total < best.get(stop, float("inf")):
                        best[stop] = total
                        came_from[stop] = SpanHop(server, position, stop)
                        heapq.heappush(queue, (total, stop))
        if end not in came_from and start != end:
            reachable = max(best)
            raise NoRouteError(f"no known server holds block {reachable} with room for this session "
                               f"(blocks {reachable}:{end} are uncovered)")
        hops, position = [], end
        while position != start:
            hop = came_from[position]
            hops.append(hop)
            position = hop.start
        return cls(tuple(reversed(hops)))

    def describe(self) -> str:
        return " -> ".join(f"{h.start}:{h.end}@..{h.server.peer_id[-6:]}" for h in self.hops)
