"""One flooding peer against one legitimate client on the same server: the client's decode-step
latency alone and under the flood, side by side in one run, and the server's memory.

    python benchmarks/peer_flood.py [--flood-sessions 8] [--prefill 256] [--steps 40] [--threads 2]
                                    [--peer-steps 200 ...] [--model PATH]

For each ``--peer-steps`` value (the server's ``--peer-steps``; other per-peer limits at their
defaults), one real `petald serve` process holds every block of the model (SmolLM2 by default).
A flooding peer (another process, its own identity) runs ``--flood-sessions`` sessions that each
send a ``--prefill``-token prompt, then decode steps as fast as they are answered, then start
over. The legitimate client (this process, another peer) runs one session of teacher-forced
decode steps: ``--steps`` steps alone, then ``--steps`` under the flood, then ``--steps`` alone
again; the ratio is the median step under the flood over the median of the two quiet phases.
The server's RSS is read before, during and after the flood. On one machine the flooding process
competes with the server for the CPU, which a remote flooder would not: ``--flood-nice`` runs it
at nice 19.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import trio  # noqa: E402

from petald.cli.local_swarm import LocalSwarm  # noqa: E402
from petald.p2pnode.client.distributed_model import DistributedModel  # noqa: E402
from petald.p2pnode.client.inference_session import InferenceSession  # noqa: E402


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def flood(address: str, model_path: str | None, sessions: int, prefill: int) -> None:
    """The flooding peer (a process of its own): ``sessions`` sessions, prompt then decode, forever."""
    with DistributedModel([address], model_path, wire="float16") as model:
        route = model.route()
        hidden_size = route.hops[0].server.info.hidden_size
        options = dataclasses.replace(model.options, step_timeout=600.0)

        async def one(seed: int) -> None:
            gen = torch.Generator().manual_seed(seed)
            while True:
                session = InferenceSession(model.node.host, route, model.identity, 1, prefill + 256, options)
                try:
                    await session.open()
                    await session.step(torch.randn(1, prefill, hidden_size, generator=gen))
                    for _ in range(255):
                        await session.step(torch.randn(1, 1, hidden_size, generator=gen))
                except Exception as exc:  # refused or paced out: try again, as a flooder would
                    say(f"flood session: {type(exc).__name__}: {str(exc)[:120]}")
                    await trio.sleep(0.1)
                finally:
                    await session.close()

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                for i in range(sessions):
                    nursery.start_soon(one, i)

        model.node.call(run)


def step_latencies(model: DistributedModel, session: InferenceSession, steps: int, gen: torch.Generator) -> list[float]:
    hidden_size = session.route.hops[0].server.info.hidden_size
    out = []
    for _ in range(steps):
        hidden = torch.randn(1, 1, hidden_size, generator=gen)
        began = time.perf_counter()
        model.node.call(session.step, hidden)
        out.append(time.perf_counter() - began)
    return out


def measure(args: argparse.Namespace, peer_steps: float) -> dict:
    extra = ["--threads", str(args.threads), "--max-length", "2048", "--peer-steps", str(peer_steps)]
    with LocalSwarm(["0:" + str(args.blocks)] if args.blocks else ["auto"], model=args.model, extra_args=extra,
                    log=say) as swarm:
        server = swarm.servers[0].process
        with DistributedModel(swarm.addresses, args.model, wire="float16") as model:
            gen = torch.Generator().manual_seed(0)
            with model.inference_session(1, 8 + 3 * args.steps + 8) as session:
                model.node.call(session.step, torch.randn(1, 8, model.head.embed(torch.tensor([[1]])).shape[-1]))
                step_latencies(model, session, 5, gen)  # warm-up
                rss = {"before": rss_mib(server.pid)}
                quiet = step_latencies(model, session, args.steps, gen)
                nice = ["nice", "-n", "19"] if args.flood_nice else []  # on one machine: the flooder's own CPU
                flooder = subprocess.Popen([*nice, sys.executable, __file__, "--flood-worker", swarm.addresses[0],
                                            "--flood-sessions", str(args.flood_sessions), "--prefill", str(args.prefill)]
                                           + (["--model", args.model] if args.model else []))
                try:
                    time.sleep(args.flood_warmup)  # its sessions open and fill the executor
                    loaded = step_latencies(model, session, args.steps, gen)
                    rss["during"] = rss_mib(server.pid)
                finally:
                    flooder.terminate()
                    flooder.wait(30)
                time.sleep(2)
                quiet += step_latencies(model, session, args.steps, gen)
                rss["after"] = rss_mib(server.pid)
    quiet_ms, loaded_ms = statistics.median(quiet) * 1000, statistics.median(loaded) * 1000
    return {"peer_steps": peer_steps, "quiet_median_ms": round(quiet_ms, 1), "flooded_median_ms": round(loaded_ms, 1),
            "ratio": round(loaded_ms / quiet_ms, 2), "flooded_p90_ms": round(sorted(loaded)[int(0.9 * len(loaded))] * 1000, 1),
            "server_rss_mib": {k: round(v) for k, v in rss.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood-worker", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help="a model directory or GGUF (default: SmolLM2-135M)")
    parser.add_argument("--blocks", type=int, default=0, help="the model's block count (0: the server picks)")
    parser.add_argument("--flood-sessions", type=int, default=8)
    parser.add_argument("--prefill", type=int, default=256, help="tokens of each flood session's prompt")
    parser.add_argument("--steps", type=int, default=40, help="the client's decode steps per phase")
    parser.add_argument("--flood-warmup", type=float, default=5.0, help="seconds the flood runs before measuring")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the server")
    parser.add_argument("--flood-nice", action="store_true",
                        help="run the flooder at nice 19: on one machine its own CPU use is not what a remote one costs")
    parser.add_argument("--peer-steps", type=float, nargs="+", default=[1e9, 200.0, 20.0],
                        help="the server's --peer-steps, one run each (1e9: no step limit)")
    parser.add_argument("--out", default="benchmarks/results/peer_flood.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.flood_worker:
        flood(args.flood_worker, args.model, args.flood_sessions, args.prefill)
        return
    results = {"model": args.model or "SmolLM2-135M", "flood_sessions": args.flood_sessions, "prefill": args.prefill,
               "steps": args.steps, "threads": args.threads,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "runs": []}
    for peer_steps in args.peer_steps:
        run = measure(args, peer_steps)
        say(json.dumps(run))
        results["runs"].append(run)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
