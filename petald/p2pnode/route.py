"""Which servers run which blocks: a chain of hops covering a span with the fewest hops."""

from __future__ import annotations

from dataclasses import dataclass

from petald.protocol.messages import ServerInfo


class NoRouteError(Exception):
    """No chain of known servers covers the blocks asked for."""


@dataclass(frozen=True)
class RemoteServer:
    peer_id: str
    address: str
    info: ServerInfo


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
             split_after: frozenset[int] = frozenset()) -> SpanRoute:
        """Cover [start, end) greedily: at each block take the server that reaches furthest.

        ``split_after`` forces a hop boundary after those blocks (to read hidden states there).
        """
        hops, position = [], start
        while position < end:
            covering = [s for s in servers if s.info.start <= position < s.info.end]
            if not covering:
                raise NoRouteError(f"no known server holds block {position} "
                                   f"(blocks {position}:{end} are uncovered by the peers given)")
            best = max(covering, key=lambda s: s.info.end)
            stop = min(best.info.end, end)
            cuts = [b + 1 for b in split_after if position <= b < stop - 1]
            stop = min(cuts, default=stop)
            hops.append(SpanHop(best, position, stop))
            position = stop
        return cls(tuple(hops))

    def describe(self) -> str:
        return " -> ".join(f"{h.start}:{h.end}@..{h.server.peer_id[-6:]}" for h in self.hops)
