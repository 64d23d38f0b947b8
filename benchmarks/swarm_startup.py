"""How long a 4-server swarm takes to become routable, and a client to its first token.

    python benchmarks/swarm_startup.py [--servers 4] [--num-blocks 8] [--runs 3]

Each run starts fresh ``petald serve --blocks auto`` processes on 127.0.0.1 (the
first with ``--new-swarm``, the others joining it together), with an empty cache
directory so the first server measures its throughput and parses the GGUF as on a
new machine. It records when each server is routable (prints its address, record
online) and when the swarm map first shows every block served (servers started
together may pick the same span and then spread out); then it runs ``petald
generate --initial-peers`` (a new process) and times its first token on stdout.
The client's time is also split, in this process: opening the model, finding
servers in the DHT, and the first token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from petald.cli.local_swarm import LocalSwarm  # noqa: E402
from petald.p2pnode.client.node_thread import NodeThread  # noqa: E402
from petald.p2pnode.swarm.swarm_map import read_swarm  # noqa: E402
from petald.p2pnode.transport.identity import load_or_create_identity  # noqa: E402


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def first_token_seconds(address: str) -> tuple[float, float]:
    """Seconds from ``petald generate`` start to its first output byte, and to its exit."""
    began = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "petald.cli.main", "generate", "The capital of France is",
                             "--initial-peers", address, "--max-new-tokens", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.read(1)
    first = time.monotonic() - began
    proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"petald generate failed with exit code {proc.returncode}")
    return first, time.monotonic() - began


def wait_until_covered(address: str, servers: int, timeout: float = 300.0) -> float:
    """Monotonic time at which the swarm map first shows every block served by ``servers`` online."""
    node = NodeThread(load_or_create_identity(None), with_dht=True)
    try:
        async def covered() -> bool:
            assert node.dht is not None
            if not node.dht.kad.routing_table.get_peer_ids():
                await node.dht.join([address])
            models = await read_swarm(node.dht, rounds=1)
            return any(not m.uncovered and sum(s.state == "online" for s in m.servers) == servers for m in models)

        deadline = time.monotonic() + timeout
        while not node.call(covered):
            if time.monotonic() > deadline:
                raise RuntimeError("the swarm did not cover every block in time")
            time.sleep(0.5)
        return time.monotonic()
    finally:
        node.stop()


def client_phases(address: str) -> dict[str, float]:
    """The same work in this process, phase by phase."""
    from petald.kernels.sources.open_source import open_source
    from petald.p2pnode.client.distributed_model import DistributedModel

    t0 = time.monotonic()
    source = open_source(None)
    t1 = time.monotonic()
    with DistributedModel(model=source, initial_peers=[address]) as model:
        t2 = time.monotonic()
        ids = model.tokenizer("The capital of France is", return_tensors="pt").input_ids
        model.generate(ids, max_new_tokens=1)
        t3 = time.monotonic()
    return {"open model": t1 - t0, "join + find servers + RTTs": t2 - t1, "prefill + first token": t3 - t2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--num-blocks", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    first_ready, joiners_ready, covered, ttft, total, phases = [], [], [], [], [], []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["PETALD_CACHE_DIR"] = cache  # the first server measures throughput, as on a new machine
            extra = ["--threads", "1", "--num-blocks", str(args.num_blocks)]
            with LocalSwarm(["auto"] * args.servers, extra_args=extra) as swarm:
                ready = [s.ready_at - s.started_at for s in swarm.servers]
                first_ready.append(ready[0])
                joiners_ready.extend(ready[1:])
                covered.append(wait_until_covered(swarm.addresses[0], args.servers) - swarm.servers[0].started_at)
                say(f"run {run + 1}: start to routable {', '.join(f'{r:.1f}' for r in ready)} s; "
                    f"every block served {covered[-1]:.1f} s after the first server started")
                first, whole = first_token_seconds(swarm.addresses[-1])
                ttft.append(first)
                total.append(whole)
                phases.append(client_phases(swarm.addresses[-1]))
                say(f"run {run + 1}: generate first token {first:.1f} s ({whole:.1f} s for 8 tokens)")

    def line(name: str, values: list[float]) -> str:
        return f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |"

    print(f"\n{args.servers} servers, --blocks auto --num-blocks {args.num_blocks}, {args.runs} runs (seconds)\n")
    print("| measure | median | min | max |\n|---|---|---|---|")
    print(line("first server (new swarm, measures throughput): start to routable", first_ready))
    print(line("joining servers (cached throughput): start to routable", joiners_ready))
    print(line("first server's start to every block served", covered))
    print(line("`petald generate --initial-peers`: start to first token", ttft))
    print(line("`petald generate`: start to exit (8 tokens)", total))
    for name in phases[0]:
        print(line(f"in-process client: {name}", [p[name] for p in phases]))


if __name__ == "__main__":
    main()
