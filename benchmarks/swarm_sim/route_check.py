"""Routes at scale: petald's own planner and bans against the true quickest chain.

A decode step through a route of servers goes client -> first server -> (pushed) next server ...
-> last server -> client (servers push each step to the next hop, docs/architecture.md, "The path
of one token"); its latency is those one-way delays plus every hop's compute (blocks / announced
steps per second) and petald's per-hop overhead. petald's planner (``SpanRoute.plan``) does not
know the servers' delays to each other: it prices a hop at the client's round trip to its server.
``quickest_chain`` finds the true optimum of the same latency by dynamic programming over block
positions (Dijkstra over a graph whose positions only grow), with every one-way delay known.
"""

from __future__ import annotations

import numpy as np

from petald.p2pnode.routing.bans import ServerBans
from petald.p2pnode.routing.route import HOP_OVERHEAD_S, NoRouteError, RemoteServer, SpanRoute
from petald.protocol.messages import ServerInfo

from .geography import Geography

MODEL_ID = "llama-2-70b-shaped"


def remote_server(peer_id: str, start: int, end: int, num_blocks: int, rtt: float, rps: float) -> RemoteServer:
    """What a client knows of a server: its record and the round trip it measured."""
    info = ServerInfo(model_id=MODEL_ID, fingerprint="sim", num_blocks=num_blocks, start=start, end=end,
                      dtype="float16", hidden_size=8192, max_length=8192, free_cache_tokens=1 << 20, version="sim")
    return RemoteServer(peer_id, "/sim", info, rtt, rps)


def chain_latency(geo: Geography, client: int, hops: list[tuple[int, int, float]]) -> float:
    """Seconds for one decode step through ``hops`` (node, blocks, steps/s per block) by pushes."""
    nodes = [client] + [h[0] for h in hops] + [client]
    delays = sum(float(geo.one_way(np.array([a]), np.array([b]))[0, 0]) for a, b in zip(nodes, nodes[1:], strict=False))
    return delays + sum(HOP_OVERHEAD_S + blocks / rps for _, blocks, rps in hops)


def quickest_chain(geo: Geography, client: int, nodes: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                   rps: np.ndarray, num_blocks: int) -> float:
    """The least latency of any chain of these servers over every block (same model as chain_latency)."""
    count = len(nodes)
    arrival = [np.full(count, np.inf) for _ in range(num_blocks + 1)]  # output of a hop ending here, at server i
    for position in range(num_blocks):
        holders = np.flatnonzero((starts <= position) & (ends > position))
        if position == 0:
            entry = geo.one_way(np.array([client]), nodes[holders])[0]
        else:
            sources = np.flatnonzero(np.isfinite(arrival[position]))
            if not len(sources) or not len(holders):
                return float("inf")
            # A delay is site-to-site propagation plus both ends' access delays: the best source per
            # site first (exact), then sites to holders: a few hundred rows instead of thousands.
            ready = arrival[position][sources] + geo.access_s[nodes[sources]]
            per_site = np.full(len(geo.site_units), np.inf)
            np.minimum.at(per_site, geo.sites[nodes[sources]], ready)
            sites = np.flatnonzero(np.isfinite(per_site))
            via = (per_site[sites][:, None] + geo.propagation[np.ix_(sites, geo.sites[nodes[holders]])]).min(axis=0)
            entry = via + geo.access_s[nodes[holders]]
        for stop in range(position + 1, num_blocks + 1):
            reach = ends[holders] >= stop
            if not reach.any():
                break
            cost = entry[reach] + HOP_OVERHEAD_S + (stop - position) / rps[holders][reach]
            np.minimum.at(arrival[stop], holders[reach], cost)
    last = np.flatnonzero(np.isfinite(arrival[num_blocks]))
    if not len(last):
        return float("inf")
    return float((arrival[num_blocks][last] + geo.one_way(nodes[last], np.array([client]))[:, 0]).min())


class SimClient:
    """One client that stays: petald's bans, on a clock of simulated seconds, and the servers it last read."""

    def __init__(self, node: int, now: float):
        self.node = node
        self.now = now
        self.bans = ServerBans(clock=lambda: self.now)
        self.known: list[RemoteServer] = []

    def route(self, live_view: list[RemoteServer], alive: set[str], num_blocks: int) -> tuple[SpanRoute, int]:
        """A route the way ``DistributedModel._find_route`` and ``Failover`` find one: plan over the
        servers known and not banned; a hop whose server is gone fails, is banned and the route is
        planned again; when no route is left, read the swarm again. Returns it and the failures met."""
        failures = 0
        for _ in range(1000):
            self.known = [s for s in self.known if not self.bans.has_failed(s.peer_id)]
            usable = [s for s in self.known if not self.bans.is_banned(s.peer_id)]
            try:
                route = SpanRoute.plan(usable, 0, num_blocks)
            except NoRouteError:
                self.known = list(live_view)  # _refresh_servers: what the DHT lists, measured
                continue
            dead = next((hop.server.peer_id for hop in route.hops if hop.server.peer_id not in alive), None)
            if dead is None:
                return route, failures
            self.bans.ban(dead)
            failures += 1
        raise RuntimeError("no route after 1000 tries")
