"""Twenty real servers with --blocks auto under churn, four clients generating all the while.

    python benchmarks/swarm_churn.py [--servers 20] [--clients 4] [--churn-every 6] [--churn-for 180]

Servers (``--blocks auto --num-blocks 4 --threads 1 --quant none``, SmolLM2's 30 blocks) join one by
one, each through the first. Once every block is served, ``--clients`` clients (each its own
``DistributedModel`` in this process, through the DHT) generate greedily, one generation after
another, and their tokens are compared with transformers' own. Once all servers joined, every
``--churn-every`` seconds (exponentially distributed) a serving server leaves, with SIGTERM or
SIGKILL (never the first: a swarm's initial peers are stable), or, while fewer than
``--servers`` run, a new one joins, for ``--churn-for`` seconds.

What each server serves is read from its own output (``serving blocks A:B`` once it is routable,
``rebalancing`` when it leaves its span, the signal when it leaves), twice a second. Reported:
generations identical to the oracle; for each departure that left a block unserved, the time
until every block was served again; the seconds during which a block was unserved while some
server held only blocks that others held too (it could have moved there); and each server
process's memory (RSS, and PSS, which shares the libraries' pages among the processes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.chaos import PROMPTS, oracle_tokens, say  # noqa: E402
from petald.cli.local_swarm import LocalSwarm, ServerProcess  # noqa: E402

NUM_BLOCKS = 30  # SmolLM2
SERVING = re.compile(r"serving blocks (\d+):(\d+) ")


def served_span(server: ServerProcess, signalled: bool) -> tuple[int, int] | None:
    """What the server serves now, by its own words: its last ``serving blocks A:B`` line, unless it
    has since started to move, been signalled or died."""
    if signalled or server.process.poll() is not None:
        return None
    for line in reversed(server.output):
        match = SERVING.search(line)
        if match:
            return int(match.group(1)), int(match.group(2))
        if line.startswith("rebalancing:"):
            return None
    return None


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in KiB."""
    def field(path: str, name: str) -> int:
        try:
            with open(path) as text:
                return next((int(line.split()[1]) for line in text if line.startswith(name)), 0)
        except OSError:
            return 0
    return field(f"/proc/{pid}/status", "VmRSS:"), field(f"/proc/{pid}/smaps_rollup", "Pss:")


class CoverageWatch:
    """Twice a second: which blocks are served, and whether a movable server sits idle beside a gap."""

    def __init__(self, swarm: LocalSwarm):
        self.swarm = swarm
        self.signalled: set[int] = set()  # pids that were sent SIGTERM or SIGKILL
        self.departures: list[tuple[float, str, set[int]]] = []  # (time, how, blocks it left unserved)
        self.samples: list[tuple[float, list[int], bool]] = []  # (time, holders per block, a server could move to a gap)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def coverage(self) -> tuple[list[int], list[tuple[int, int]]]:
        spans = [s for s in (served_span(server, server.process.pid in self.signalled)
                             for server in list(self.swarm.servers)) if s is not None]
        holders = [sum(a <= b < e for a, e in spans) for b in range(NUM_BLOCKS)]
        return holders, spans

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            holders, spans = self.coverage()
            gap = any(h == 0 for h in holders)
            spare = any(all(holders[b] >= 2 for b in range(a, e)) for a, e in spans)
            self.samples.append((time.monotonic(), holders, gap and spare))

    def depart(self, server: ServerProcess, sig: int) -> None:
        before = self.coverage()[0]
        self.signalled.add(server.process.pid)
        server.process.send_signal(sig)
        after = self.coverage()[0]
        unserved = {b for b in range(NUM_BLOCKS) if before[b] > 0 and after[b] == 0}
        self.departures.append((time.monotonic(), signal.Signals(sig).name, unserved))

    def restore_seconds(self) -> list[float]:
        """For each departure that left blocks unserved: until each of them was served again."""
        out = []
        for left, _, unserved in self.departures:
            if unserved:
                back = next((t for t, holders, _ in self.samples
                             if t > left and all(holders[b] > 0 for b in unserved)), None)
                out.append(round(back - left, 1) if back is not None else float("inf"))
        return out

    def idle_beside_gap_seconds(self, since: float) -> float:
        """Seconds (after ``since``, once every block was first served) with a block unserved while
        some server held only blocks that others held too: it could have moved there."""
        return 0.5 * sum(idle for t, _, idle in self.samples if t >= since)


def clients_generate(model_factory, prompts, expected, tokens: int, stop: threading.Event, results: list) -> None:  # noqa: ANN001
    model = model_factory()
    try:
        index = random.randrange(len(prompts))
        while not stop.is_set():
            ids = prompts[index % len(prompts)]
            try:
                out = model.generate(ids, max_new_tokens=tokens, eos_token_id=[])
                results.append(out[0, ids.shape[1]:].tolist() == expected[index % len(prompts)])
            except Exception as exc:  # a failed generation is a result here, not a crash
                results.append(f"{type(exc).__name__}: {exc}")
                say(f"a generation failed: {exc}")
            index += 1
    finally:
        model.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--churn-every", type=float, default=6.0, help="mean seconds between two churn events")
    parser.add_argument("--churn-for", type=float, default=150.0)
    parser.add_argument("--join-every", type=float, default=10.0,
                        help="seconds between two servers' starts (servers that read the swarm at once choose alike)")
    parser.add_argument("--rebalance-period", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--logs", type=Path, help="write each server's output here (server-<n>.log)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    from petald.kernels.sources.open_source import open_source
    from petald.p2pnode.client.distributed_model import DistributedModel

    torch.set_num_threads(1)
    tokenizer = open_source(None).load_tokenizer()
    prompts = [tokenizer(text, return_tensors="pt").input_ids for text in PROMPTS]
    say("computing the oracle's tokens with transformers")
    expected = oracle_tokens(prompts, args.tokens)
    server_args = ["--num-blocks", "4", "--threads", "1", "--announce-period", "5", "--shutdown-grace", "5",
                   "--rebalance-period", str(args.rebalance_period)]
    began = time.monotonic()
    results: list = []
    stop_clients = threading.Event()
    with LocalSwarm(["auto"], extra_args=server_args, log=say, start_timeout=300) as swarm:
        watch = CoverageWatch(swarm)
        watch.thread.start()
        first = swarm.servers[0].address
        memory: dict[int, tuple[int, int]] = {}
        clients: list[threading.Thread] = []

        def factory() -> DistributedModel:
            return DistributedModel(initial_peers=[first], step_timeout=30.0, recovery_timeout=180.0)

        def join() -> None:
            """Start one more server without waiting for it (a join takes a minute on a busy machine)."""
            def start() -> None:
                try:
                    server = swarm.add("auto")
                except RuntimeError as exc:
                    say(f"a server did not start: {exc}")
                    return
                time.sleep(1.0)
                memory[server.process.pid] = memory_kib(server.process.pid)
                say(f"joined: blocks {served_span(server, False)} ({len(memory)} started)")
            say("a server starts")
            joiner = threading.Thread(target=start, daemon=True)
            joiner.start()
            joiners.append(joiner)

        def start_clients_once_covered() -> None:
            nonlocal covered_at
            if covered_at is None and min(watch.coverage()[0]) > 0:
                covered_at = time.monotonic() - began
                say(f"every block served after {covered_at:.0f} s: {args.clients} clients start")
                for _ in range(args.clients):
                    clients.append(threading.Thread(target=clients_generate, daemon=True, args=(
                        factory, prompts, expected, args.tokens, stop_clients, results)))
                    clients[-1].start()

        memory[swarm.servers[0].process.pid] = memory_kib(swarm.servers[0].process.pid)
        covered_at: float | None = None
        joiners: list[threading.Thread] = []
        for _ in range(args.servers - 1):  # one by one, --join-every apart
            join()
            time.sleep(args.join_every)
            start_clients_once_covered()
        for joiner in joiners:
            while joiner.is_alive():
                joiner.join(1.0)
                start_clients_once_covered()
        say(f"all {len(memory)} servers started: churn for {args.churn_for:.0f} s")
        churn_end = time.monotonic() + args.churn_for
        while time.monotonic() < churn_end:
            time.sleep(rng.expovariate(1.0 / args.churn_every))
            start_clients_once_covered()
            alive = [s for s in swarm.servers[1:] if s.process.poll() is None and s.process.pid not in watch.signalled]
            serving = [s for s in alive if served_span(s, False) is not None]
            if len(alive) + 1 < args.servers or not serving:  # a departure is followed by a join
                join()
            else:
                victim = rng.choice(serving)
                sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
                say(f"churn: {sig.name} to the server of blocks {served_span(victim, False)}")
                watch.depart(victim, sig)
        say("churn over: letting the swarm settle")
        settle_end = time.monotonic() + 60
        while time.monotonic() < settle_end and min(watch.coverage()[0]) == 0:
            time.sleep(1.0)
        stop_clients.set()
        for client in clients:
            client.join(120)
        watch.stop.set()
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            for n, server in enumerate(swarm.servers):
                (args.logs / f"server-{n}.log").write_text("\n".join(server.output) + "\n")
    rss = [m[0] / 1024 for m in memory.values() if m[0]]
    pss = [m[1] / 1024 for m in memory.values() if m[1]]
    restore = watch.restore_seconds()
    report = {
        "servers_started": len(memory), "departures": len(watch.departures),
        "departures_leaving_a_gap": len(restore), "restore_s": restore,
        "restore_s_max": max(restore, default=0.0),
        "every_block_first_served_s": covered_at,
        "seconds_with_a_gap_beside_a_movable_server": (watch.idle_beside_gap_seconds(began + covered_at)
                                                        if covered_at is not None else None),
        "generations": len(results), "identical": sum(r is True for r in results),
        "different": sum(r is False for r in results), "failed": [r for r in results if isinstance(r, str)],
        "rss_mib_median": round(statistics.median(rss), 1) if rss else None, "rss_mib_max": round(max(rss), 1) if rss else None,
        "pss_mib_median": round(statistics.median(pss), 1) if pss else None,
        "wall_s": round(time.monotonic() - began, 1), "load": os.getloadavg(),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
