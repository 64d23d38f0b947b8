"""A swarm of N simulated servers running petald's own placement, rebalancing, routing and bans.

    python benchmarks/swarm_simulation.py --servers 10000 [--seed 1] [--clients 4] [--json out.json]

N servers (hardware and block counts from benchmarks/swarm_sim/population.py, places and round
trips from geography.py) join over ``--formation`` seconds, then servers leave (half with
SIGTERM, half crashing) and join as Poisson processes (mean lifetime ``--lifetime-h``); at
``--outage-at`` the 10% of servers nearest one of them crash together (a regional outage). Every
server chooses and moves its span with petald's ``choose_start`` / ``move_target`` on the
``RebalanceSchedule`` (swarm_events.py). Clients plan with petald's ``SpanRoute.plan`` and ban
with ``ServerBans`` (route_check.py). The DHT's lookups run py-libp2p's RoutingTable and lookup
(dht_model.py); its upkeep is priced from real message sizes (dht_upkeep.py).

Reported: the weakest block's throughput against an upper bound (every server's throughput
spread evenly over all blocks), route latency against the quickest chain, the time to cover every
block again and to reach 0.8 of the bound after the outage, lookup hops against log2 N, and each
server's DHT upkeep per minute. Goals: weakest >= 0.8 x bound, routes <= 1.2 x quickest, lookups
<= 1.5 x log2 N.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.swarm_sim.dht_model import DhtModel  # noqa: E402
from benchmarks.swarm_sim.dht_upkeep import ReadPlan, upkeep  # noqa: E402
from benchmarks.swarm_sim.geography import Geography  # noqa: E402
from benchmarks.swarm_sim.population import HardwarePool  # noqa: E402
from benchmarks.swarm_sim.route_check import SimClient, chain_latency, quickest_chain, remote_server  # noqa: E402
from benchmarks.swarm_sim.swarm_events import ANNOUNCE_PERIOD_S, REBALANCE_PERIOD_S, SwarmEvents  # noqa: E402
from petald.p2pnode.routing.route import SpanRoute  # noqa: E402

SAMPLE_S = 10.0
GOAL_WEAKEST, GOAL_ROUTE, GOAL_HOPS = 0.8, 1.2, 1.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--formation", type=float, default=1200.0, help="seconds over which the first N join")
    parser.add_argument("--lifetime-h", type=float, default=3.0, help="mean hours a server stays")
    parser.add_argument("--outage-at", type=float, default=2400.0)
    parser.add_argument("--outage-share", type=float, default=0.1)
    parser.add_argument("--outage", choices=["blocks", "region"], default="blocks",
                        help="which servers crash together (swarm_events.SwarmEvents.outage)")
    parser.add_argument("--end", type=float, default=3600.0)
    parser.add_argument("--clients", type=int, default=4, help="clients routing at each of the 6 checks")
    parser.add_argument("--lookups", type=int, default=100)
    parser.add_argument("--json", type=Path, help="write the report here too")
    return parser.parse_args(argv)


def route_check(swarm: SwarmEvents, clients: list[SimClient], rng: random.Random) -> dict:
    """Each client routes now: a fresh plan over the live swarm against the quickest chain, and its
    standing plan (servers it read before) with bans until a live route is found."""
    live = [s for s in swarm.servers.values() if s.online]
    nodes = np.array([s.node for s in live])
    starts = np.array([s.start for s in live])
    ends = starts + np.array([s.length for s in live])
    rps = np.array([s.hardware.inference_rps for s in live])
    by_peer = {s.peer_id: s for s in live}
    ratios, failures, plan_s = [], [], []
    for client in clients:
        client.now = swarm.now
        rtts = swarm.geo.rtt(client.node, nodes)
        view = [remote_server(s.peer_id, s.start, s.start + s.length, swarm.num_blocks, float(r), s.hardware.inference_rps)
                for s, r in zip(live, rtts, strict=True)]
        standing, failed = client.route(view, set(by_peer), swarm.num_blocks)
        failures.append(failed)
        began = time.perf_counter()
        fresh = SpanRoute.plan(view, 0, swarm.num_blocks)  # a client that just read the swarm
        plan_s.append(time.perf_counter() - began)
        hops = [(by_peer[h.server.peer_id].node, h.end - h.start, by_peer[h.server.peer_id].hardware.inference_rps)
                for h in fresh.hops]
        best = quickest_chain(swarm.geo, client.node, nodes, starts, ends, rps, swarm.num_blocks)
        ratios.append(chain_latency(swarm.geo, client.node, hops) / best)
        standing_hops = [(by_peer[h.server.peer_id].node, h.end - h.start,
                          by_peer[h.server.peer_id].hardware.inference_rps) for h in standing.hops]
        ratios[-1] = (ratios[-1], chain_latency(swarm.geo, client.node, standing_hops) / best, best, len(fresh.hops))
    return {"time": swarm.now, "fresh_ratio": [r[0] for r in ratios], "standing_ratio": [r[1] for r in ratios],
            "quickest_ms": [1000 * r[2] for r in ratios], "hops": [r[3] for r in ratios],
            "failures": failures, "plan_s": plan_s}


def simulate(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    np_rng = np.random.default_rng(args.seed)
    geo, pool = Geography(np_rng), HardwarePool(np_rng)
    swarm = SwarmEvents(args.servers, geo, pool, rng, args.lifetime_h * 3600, args.formation)
    swarm.churn(args.formation, args.end)  # once the first N joined: Poisson departures, and joins at the same rate
    checks = sorted({args.formation, (args.formation + args.outage_at) / 2, args.outage_at - 1, args.outage_at + 30,
                     args.outage_at + 120, args.end - 1})
    clients = [SimClient(int(geo.add(1)[0]), 0.0) for _ in range(args.clients)]
    routes, outage_victims, t = [], 0, 0.0
    began = time.perf_counter()
    while t < args.end:
        t = min(t + SAMPLE_S, args.end)
        for check in [c for c in checks if t - SAMPLE_S < c <= t]:
            swarm.run_until(check)
            routes.append(route_check(swarm, clients, rng))
        if t - SAMPLE_S < args.outage_at <= t:
            swarm.run_until(args.outage_at)
            swarm.sample()
            outage_victims = swarm.outage(args.outage_share, args.outage)
        swarm.run_until(t)
        swarm.sample()
    swarm_s = time.perf_counter() - began
    dht = DhtModel(args.servers, np_rng).measure(args.lookups)
    mean_blocks = statistics.mean(s.length for s in swarm.servers.values())
    # How a --blocks auto server reads the swarm each rebalance period: now the model key's providers
    # (ServerNode._swarm_records); until issue 24, every block key's providers.
    reads = {"model_key": ReadPlan(1, args.servers, args.servers - 1),
             "every_block_key": ReadPlan(swarm.num_blocks, args.servers * mean_blocks / swarm.num_blocks,
                                         args.servers - 1)}
    costs = {name: dataclasses.asdict(upkeep(args.servers, mean_blocks, swarm.num_blocks, dht.queries_mean, plan,
                                             ANNOUNCE_PERIOD_S, REBALANCE_PERIOD_S)) for name, plan in reads.items()}
    return {"servers": args.servers, "seed": args.seed, "swarm_seconds": swarm_s, "moves": swarm.moves,
            "checks": swarm.checks, "departures": swarm.departures, "outage_victims": outage_victims,
            "mean_blocks": mean_blocks, "num_blocks": swarm.num_blocks,
            "samples": [dataclasses.asdict(s) for s in swarm.samples], "routes": routes,
            "dht": dataclasses.asdict(dht), "upkeep": costs["model_key"],
            "upkeep_every_block_key": costs["every_block_key"]}


def summarize(report: dict, args: argparse.Namespace) -> dict:
    samples = report["samples"]
    ratio = [(s["time"], s["weakest"] / s["ideal"] if s["ideal"] else 0.0, s["uncovered"]) for s in samples]
    steady = [r for t, r, _ in ratio if args.formation <= t < args.outage_at]
    after = [(t, r, u) for t, r, u in ratio if t > args.outage_at]
    # 0: the outage never uncovered a block (or never took the weakest below the goal).
    covered = next((t - args.outage_at for t, _, u in after if u == 0), None) if after and after[0][2] else 0.0
    restored = (next((t - args.outage_at for t, r, _ in after if r >= GOAL_WEAKEST), None)
                if after and after[0][1] < GOAL_WEAKEST else 0.0)
    fresh = [r for check in report["routes"] for r in check["fresh_ratio"]]
    standing = [r for check in report["routes"] for r in check["standing_ratio"]]
    log2n = math.log2(report["servers"])
    return {
        "weakest_over_ideal_steady_mean": statistics.mean(steady) if steady else None,
        "weakest_over_ideal_steady_min": min(steady) if steady else None,
        "weakest_over_ideal_at_end": ratio[-1][1],
        "uncovered_max_after_outage": max((u for _, _, u in after), default=0),
        "outage_to_all_covered_s": covered,
        "outage_to_weakest_0.8_s": restored,
        "route_over_quickest_mean": statistics.mean(fresh), "route_over_quickest_p95": float(np.percentile(fresh, 95)),
        "standing_route_over_quickest_mean": statistics.mean(standing),
        "route_failures_after_outage": sum(sum(c["failures"]) for c in report["routes"] if c["time"] > args.outage_at),
        "lookup_hops_mean": report["dht"]["hops_mean"], "lookup_hops_max": report["dht"]["hops_max"],
        "log2_n": log2n, "lookup_hops_over_log2n": report["dht"]["hops_mean"] / log2n,
        "route_plan_ms_mean": 1000 * statistics.mean(t for c in report["routes"] for t in c["plan_s"]),
        "upkeep_exchanges_per_min": report["upkeep"]["exchanges_per_min"],
        "upkeep_bytes_per_min": report["upkeep"]["bytes_per_min"],
        "goals": {"weakest": bool(steady) and statistics.mean(steady) >= GOAL_WEAKEST,
                  "routes": statistics.mean(fresh) <= GOAL_ROUTE,
                  "lookups": report["dht"]["hops_mean"] <= GOAL_HOPS * log2n},
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.perf_counter()
    report = simulate(args)
    report["summary"] = summarize(report, args)
    report["wall_seconds"] = time.perf_counter() - began
    s, u = report["summary"], report["upkeep"]
    print(f"{args.servers} servers ({report['mean_blocks']:.1f} of {report['num_blocks']} blocks each on average), "
          f"{report['departures']} departures, {report['moves']} moves in {report['checks']} rebalance checks, "
          f"outage of {report['outage_victims']}; simulated {args.end:.0f} s in {report['wall_seconds']:.0f} s")
    print(f"weakest block / ideal: steady mean {s['weakest_over_ideal_steady_mean']:.3f}, "
          f"min {s['weakest_over_ideal_steady_min']:.3f}, at end {s['weakest_over_ideal_at_end']:.3f}")
    print(f"after the outage: {s['uncovered_max_after_outage']} blocks uncovered at worst, all covered after "
          f"{s['outage_to_all_covered_s']} s, weakest >= 0.8 ideal after {s['outage_to_weakest_0.8_s']} s")
    print(f"routes / quickest: fresh {s['route_over_quickest_mean']:.3f} (p95 {s['route_over_quickest_p95']:.3f}), "
          f"standing {s['standing_route_over_quickest_mean']:.3f}; "
          f"{s['route_failures_after_outage']} hop failures (bans) after the outage; "
          f"SpanRoute.plan took {s['route_plan_ms_mean']:.0f} ms a route")
    print(f"lookups: {s['lookup_hops_mean']:.2f} hops (max {s['lookup_hops_max']}) vs log2 N = {s['log2_n']:.1f}; "
          f"{report['dht']['queries_mean']:.1f} queries each, found {report['dht']['found_closest_share']:.0%} "
          "of the true closest")
    print(f"DHT upkeep per server per minute: {u['exchanges_per_min']:.0f} exchanges, {u['bytes_per_min'] / 1e6:.2f} MB "
          f"(publish {u['publish_bytes'] / 1e6:.2f}, provide {u['provide_bytes'] / 1e6:.2f}, "
          f"swarm reads {u['read_bytes'] / 1e6:.2f}); answers {u['record_requests_answered_per_min']:.0f} "
          f"record requests; stores {u['records_stored_mean']:.0f} records (max {u['records_stored_max']:.0f}); "
          f"reading every block key instead: {report['upkeep_every_block_key']['bytes_per_min'] / 1e6:.2f} MB")
    print("goals: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in s["goals"].items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
