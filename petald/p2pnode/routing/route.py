"""Which servers run which blocks: the chain of hops that should answer a step soonest.

A hop costs its round trip plus its blocks' compute (blocks / announced steps per second
per block) plus a small constant, so that among equals the route with fewer hops wins.
Servers without figures (peers given directly) cost the constant alone: fewest hops.

Training routes for throughput instead: a hop's compute is the chunk's tokens through its
blocks at the announced forward tokens per second (three passes: the forward, and the
backward's recomputed forward and its gradients), plus the work already given to that server
by the other chunks of the same batch, so that parallel chunks spread over replicas.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from petald.protocol.messages import ServerInfo

HOP_OVERHEAD_S = 1e-3  # serialisation and scheduling of one more hop
TRAINING_PASSES = 3  # a training chunk's compute on a hop, in forwards of its tokens


class NoRouteError(Exception):
    """No chain of known servers covers the blocks asked for; ``uncovered`` names the gaps."""

    def __init__(self, message: str, uncovered: list[tuple[int, int]]):
        super().__init__(message)
        self.uncovered = uncovered


class SessionTooLarge(NoRouteError):
    """The servers that hold some blocks can never admit the session (longer than any admits, or
    more KV cache than any has in all): waiting for room would be in vain."""


class SwarmFull(NoRouteError):
    """Servers hold the blocks and could admit the session, but none has the KV cache free for it
    now: other sessions hold it (a server says ``cache_full``). Waiting may help; another server will."""

    code = "cache_full"


def format_block_ranges(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{a}:{b}" for a, b in ranges)


def never_admitted(servers: list[RemoteServer], blocks: list[tuple[int, int]], max_length: int,
                   cache_tokens_per_block: int) -> str:
    """Why no server among ``servers`` holding one of ``blocks`` can ever admit a session of
    ``max_length`` tokens needing ``cache_tokens_per_block`` KV tokens per block, or "" when some
    block has a server that could (once it has room) or no server at all (one may still join).
    A server's limits are its own settings, fixed for its life: only a new server would change them."""
    for a, b in blocks:
        for block in range(a, b):
            holders = [s for s in servers if s.info.start <= block < s.info.end]
            if not holders or any(_could_admit(s, max_length, cache_tokens_per_block) for s in holders):
                continue
            longest = max(s.info.max_length for s in holders)
            if longest < max_length:
                return (f"a session of {max_length} tokens is longer than any server of block {block} admits "
                        f"(at most {longest}): ask for fewer tokens")
            budget = max(s.info.cache_capacity_tokens for s in holders)
            return (f"a session of {max_length} tokens needs {cache_tokens_per_block} KV-cache tokens per block; "
                    f"no server of block {block} has that much in all (the largest budget: {budget} tokens over "
                    "its blocks): ask for fewer tokens, or start a server with a larger --cache-tokens")
    return ""


def lacking_room(servers: list[RemoteServer], blocks: list[tuple[int, int]], max_length: int,
                 cache_tokens_per_block: int) -> str:
    """Why ``blocks`` have no route when room is all they lack: every block has a server among
    ``servers`` that admits such a session once enough of its KV cache is free; "" otherwise."""
    most_free = 0
    for a, b in blocks:
        for block in range(a, b):
            holders = [s for s in servers if s.info.start <= block < s.info.end
                       and _could_admit(s, max_length, cache_tokens_per_block)]
            if not holders:
                return ""
            most_free = max(most_free, *(s.info.free_cache_tokens // (s.info.end - s.info.start) for s in holders))
    return (f"every server of them is full (cache_full): other sessions hold their KV caches; this session "
            f"needs {cache_tokens_per_block} cache tokens per block, the most free is {most_free}")


def unroutable(servers: list[RemoteServer], uncovered: list[tuple[int, int]], model_id: str, max_length: int,
               cache_tokens_per_block: int, holding: str, waited: str) -> NoRouteError:
    """The error for blocks ``uncovered`` still without a route when the client stops waiting:
    SwarmFull when their servers are there but full (not "no reachable server"), else NoRouteError."""
    where = f"blocks {format_block_ranges(uncovered)} of {model_id}"
    full = lacking_room(servers, uncovered, max_length, cache_tokens_per_block)
    if full:
        return SwarmFull(f"{where}: {full} ({waited}); try again later or ask for fewer tokens", uncovered)
    return NoRouteError(f"{where} have no reachable server{holding} ({waited}); start a server for them "
                        "or raise the recovery timeout", uncovered)


def _could_admit(server: RemoteServer, max_length: int, cache_tokens_per_block: int) -> bool:
    """Whether ``server`` admits such a session at all, once enough of its KV cache is free."""
    return _fits(server, max_length, cache_tokens_per_block, server.info.cache_capacity_tokens or None)


def _has_room(server: RemoteServer, max_length: int, cache_tokens_per_block: int) -> bool:
    """Whether ``server`` admits such a session now."""
    return _fits(server, max_length, cache_tokens_per_block, server.info.free_cache_tokens)


def _fits(server: RemoteServer, max_length: int, cache_tokens_per_block: int, kv_tokens: int | None) -> bool:
    """A session of ``max_length`` tokens within the server's longest, and its KV cache within
    ``kv_tokens`` (None: unknown, assumed enough). Its pages are taken in every block the server
    holds, whichever of them the session runs through."""
    info = server.info
    need = cache_tokens_per_block * (info.end - info.start)
    return info.max_length >= max_length and (kv_tokens is None or kv_tokens >= need)


def uncovered_blocks(servers: list[RemoteServer], start: int, end: int,
                     cache_tokens_per_block: int = 0, max_length: int = 0) -> list[tuple[int, int]]:
    """The runs [a, b) of blocks in [start, end) that no server holds with room for the session."""
    def held(block: int) -> bool:
        return any(s.info.start <= block < s.info.end and _has_room(s, max_length, cache_tokens_per_block)
                   for s in servers)

    runs: list[tuple[int, int]] = []
    for block in range(start, end):
        if held(block):
            continue
        if runs and runs[-1][1] == block:
            runs[-1] = (runs[-1][0], block + 1)
        else:
            runs.append((block, block + 1))
    return runs


@dataclass(frozen=True)
class RemoteServer:
    peer_id: str
    address: str
    info: ServerInfo
    rtt: float = 0.0  # seconds, measured by the client
    inference_rps: float = 0.0  # announced decode steps per second per block; 0 when unknown
    forward_tps: float = 0.0  # announced forward tokens per second per block; 0 when unknown
    network_mbps: float = 0.0  # announced bandwidth (--network-mbps); 0 when unknown

    def hop_cost(self, blocks: int, tokens: int = 0) -> float:
        """Seconds for one decode step through ``blocks`` of this server, or (``tokens`` > 0) for one
        training chunk of that many tokens."""
        if tokens:
            compute = TRAINING_PASSES * tokens * blocks / self.forward_tps if self.forward_tps > 0 else 0.0
        else:
            compute = blocks / self.inference_rps if self.inference_rps > 0 else 0.0
        return HOP_OVERHEAD_S + self.rtt + compute


def _undominated(holders: list[RemoteServer], limit: int) -> list[RemoteServer]:
    """The decode-step candidates at one position that may still give some stop the lowest cost:
    a server whose round trip is no shorter, throughput no higher and reach (its end, within
    ``limit``) no farther than an earlier-listed or quicker one's never can (hop_cost grows with
    each of them, and rounding keeps that order). Dropping them keeps the plan exact and makes
    planning over 10,000 servers take well under a second instead of seconds."""
    def speed(server: RemoteServer) -> float:
        return server.inference_rps if server.inference_rps > 0 else float("inf")  # unknown: no compute cost

    order = sorted(range(len(holders)), key=lambda i: (holders[i].rtt, i))
    fastest_reaching: dict[int, float] = {}  # reach -> the highest speed kept among servers reaching that far
    kept = []
    for i in order:
        server = holders[i]
        reach = min(server.info.end, limit)
        if fastest_reaching.get(reach, -1.0) >= speed(server):
            continue
        kept.append((i, server))
        for r in range(reach, -1, -1):  # it reaches every shorter stop too
            if fastest_reaching.get(r, -1.0) >= speed(server):
                break
            fastest_reaching[r] = speed(server)
    return [server for _, server in sorted(kept, key=lambda pair: pair[0])]


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
             split_after: frozenset[int] = frozenset(), cache_tokens_per_block: int = 0,
             tokens: int = 0, busy: dict[str, float] | None = None, max_length: int = 0) -> SpanRoute:
        """The cheapest chain covering [start, end) (Dijkstra over block positions).

        ``split_after`` forces a hop boundary after those blocks (to read hidden states there);
        ``cache_tokens_per_block`` skips servers without that much free cache per block they hold,
        ``max_length`` those that admit shorter sessions only.
        ``tokens`` > 0 plans a training chunk of that many tokens, and ``busy`` holds the seconds
        of work each server (by peer ID) already has from this batch.
        """
        busy = busy or {}
        cuts = sorted(b + 1 for b in split_after if start <= b < end - 1)
        # Each position looks at the servers holding it alone (a swarm of thousands holds each
        # block on a few hundred), in the order given: among equal costs the first one wins.
        holders: dict[int, list[RemoteServer]] = {}
        for server in servers:
            if _has_room(server, max_length, cache_tokens_per_block):
                for block in range(max(server.info.start, start), min(server.info.end, end)):
                    holders.setdefault(block, []).append(server)
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
            candidates = holders.get(position, [])
            if not busy and not tokens:
                candidates = _undominated(candidates, limit)
            for server in candidates:
                for stop in range(position + 1, min(server.info.end, limit) + 1):
                    total = cost + server.hop_cost(stop - position, tokens) + busy.get(server.peer_id, 0.0)
                    if total < best.get(stop, float("inf")):
                        best[stop] = total
                        came_from[stop] = SpanHop(server, position, stop)
                        heapq.heappush(queue, (total, stop))
        if end not in came_from and start != end:
            # With no forced cut a chain exists whenever every block is held, so a gap is named;
            # with cuts, a server may hold the blocks only across a cut.
            gaps = uncovered_blocks(servers, start, end, cache_tokens_per_block, max_length) or [(max(best), end)]
            raise NoRouteError(f"no known server holds blocks {format_block_ranges(gaps)} "
                               "with room for this session", gaps)
        hops, position = [], end
        while position != start:
            hop = came_from[position]
            hops.append(hop)
            position = hop.start
        return cls(tuple(reversed(hops)))

    def describe(self) -> str:
        return " -> ".join(f"{h.start}:{h.end}@..{h.server.peer_id[-6:]}" for h in self.hops)
