"""benchmarks/swarm_simulation.py stays working: a small swarm (200 servers, a short run) in a few
seconds, and the invariants its figures rest on (docs/benchmarks.md, "swarm_simulation.py")."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from benchmarks.swarm_sim.dht_model import DhtModel
from benchmarks.swarm_sim.geography import Geography
from benchmarks.swarm_sim.population import HardwarePool
from benchmarks.swarm_sim.route_check import chain_latency, quickest_chain, remote_server
from benchmarks.swarm_sim.swarm_events import SwarmEvents
from benchmarks.swarm_simulation import parse_args, simulate, summarize
from petald.p2pnode.routing.placement import block_coverage
from petald.p2pnode.routing.route import SpanRoute


@pytest.fixture(scope="module")
def small_run() -> tuple[dict, dict]:
    args = parse_args(["--servers", "200", "--formation", "300", "--outage-at", "600", "--end", "900",
                       "--clients", "2", "--lookups", "20"])
    report = simulate(args)
    return report, summarize(report, args)


def test_a_small_swarm_is_simulated_end_to_end(small_run):
    report, summary = small_run
    assert report["checks"] > 200 and report["outage_victims"] == 20
    # The bound is an upper bound: no placement beats every server's throughput spread evenly.
    assert all(s["weakest"] <= s["ideal"] * (1 + 1e-9) for s in report["samples"])
    # The quickest chain is a lower bound of petald's route, in the same latency model.
    assert min(r for check in report["routes"] for r in check["fresh_ratio"]) >= 1 - 1e-9
    assert report["dht"]["found_closest_share"] > 0.9 and report["dht"]["hops_max"] >= 1
    assert summary["lookup_hops_over_log2n"] < 1.5
    assert report["upkeep"]["bytes_per_min"] > report["upkeep"]["read_bytes"] > 0


def test_the_swarm_view_is_what_block_coverage_computes():
    """The simulation keeps the DHT's view incrementally; petald's own block_coverage over the
    same records must agree, through joins, moves, departures and an outage."""
    rng = np.random.default_rng(3)
    swarm = SwarmEvents(60, Geography(rng), HardwarePool(rng), random.Random(3), lifetime_s=600, formation_s=100)
    swarm.churn(100, 400)
    for until in (50, 150, 250):
        swarm.run_until(until)
        expected = block_coverage(swarm.view_records(), swarm.num_blocks)
        assert swarm.view == pytest.approx(expected, abs=1e-6)
    swarm.outage(0.1)
    swarm.run_until(400)
    crashed_still_shown = block_coverage(swarm.view_records(), swarm.num_blocks)
    assert swarm.view == pytest.approx(crashed_still_shown, abs=1e-6)


def test_quickest_chain_is_the_best_of_every_chain():
    """Against brute force over every way to cut 4 blocks among 4 servers."""
    geo = Geography(np.random.default_rng(5))
    nodes = geo.add(5)
    client, servers = int(nodes[0]), nodes[1:]
    spans = [(0, 2), (0, 4), (1, 3), (2, 4)]
    rps = np.array([50.0, 8.0, 80.0, 60.0])
    best = float("inf")
    for cuts in itertools.product([0, 1], repeat=3):
        bounds = [0] + [b + 1 for b, cut in enumerate(cuts) if cut] + [4]
        for owners in itertools.product(range(4), repeat=len(bounds) - 1):
            pieces = list(zip(bounds, bounds[1:], strict=False))
            if all(spans[o][0] <= a and b <= spans[o][1] for o, (a, b) in zip(owners, pieces, strict=True)):
                hops = [(int(servers[o]), b - a, float(rps[o])) for o, (a, b) in zip(owners, pieces, strict=True)]
                best = min(best, chain_latency(geo, client, hops))
    starts, ends = np.array([s for s, _ in spans]), np.array([e for _, e in spans])
    assert quickest_chain(geo, client, servers, starts, ends, rps, 4) == pytest.approx(best)


def test_lookups_run_the_librarys_own_iterative_search():
    stats = DhtModel(300, np.random.default_rng(7)).measure(10)
    assert stats.found_closest_share == 1.0  # every node reachable: the true k closest are found
    assert 1 <= stats.hops_mean <= stats.hops_max and stats.queries_mean >= 10


def test_route_planning_over_many_servers_stays_exact():
    """SpanRoute.plan skips servers dominated at a position (slower, farther and reaching no
    farther than another): its route must still cost what a plain search over every server finds."""
    rng = random.Random(11)
    for trial in range(20):
        servers = []
        for i in range(rng.randrange(5, 300)):
            start = rng.randrange(30)
            end = min(30, start + rng.randrange(1, 12))
            rps = rng.choice([0.0, rng.uniform(5, 500)])
            servers.append(remote_server(f"p{i}", start, end, 30, rng.choice([0.01, 0.05, rng.uniform(0.001, 0.3)]), rps))
        best = {0: 0.0}  # the cheapest way to reach each position, every server and every stop tried
        for position in range(30):
            if position not in best:
                continue
            for s in servers:
                if s.info.start <= position < s.info.end:
                    for stop in range(position + 1, s.info.end + 1):
                        best[stop] = min(best.get(stop, float("inf")), best[position] + s.hop_cost(stop - position))
        if 30 not in best:
            continue
        route = SpanRoute.plan(servers, 0, 30)
        cost = sum(h.server.hop_cost(h.end - h.start) for h in route.hops)
        assert cost == pytest.approx(best[30], rel=1e-12), trial
