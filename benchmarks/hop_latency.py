"""Round-trip cost of one decode step through 1 and 3 server processes that hold a trivial block.

    python benchmarks/hop_latency.py [--steps 400]

Each server holds one block of a tiny random Llama (hidden size 64), so compute is
~0.1 ms and what remains is the data path: the client's thread hop onto its trio
loop, framing and the tensor codec, libp2p (Noise + yamux over TCP on 127.0.0.1),
the server's hand-off to its executor thread, and back. The 3-server chain runs
with pushes (each server hands its output to the next, the default) and without
(every hop through the client).

Wall time on a shared 2-core machine moves with the other jobs; the CPU columns
(process CPU time per step, read from /proc, so Linux only) move much less and
show the cost of the path itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from petald.cli.local_swarm import LocalSwarm  # noqa: E402
from petald.p2pnode.client.distributed_model import DistributedModel  # noqa: E402
from tests.tiny_models import save_tiny_model  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(path: str, spans: list[str], steps: int, push: bool) -> tuple[list[float], float, float]:
    """Per-step wall times, and CPU seconds per step of the client and of all servers together."""
    with LocalSwarm(spans, path, extra_args=["--threads", "1"]) as swarm:
        with DistributedModel(swarm.addresses, path, push=push) as model:
            end = int(spans[-1].split(":")[1])
            with model.inference_session(1, steps + 20, model.route(0, end)) as session:
                hidden = torch.randn(1, 1, model.config.hidden_size)
                for _ in range(10):
                    model.node.call(session.step, hidden)
                pids = [s.process.pid for s in swarm.servers]
                client0, servers0 = cpu_seconds(os.getpid()), sum(map(cpu_seconds, pids))
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    model.node.call(session.step, hidden)
                    times.append(time.perf_counter() - t0)
                client = (cpu_seconds(os.getpid()) - client0) / steps
                servers = (sum(map(cpu_seconds, pids)) - servers0) / steps
    return times, client, servers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(save_tiny_model("llama", Path(tmp) / "tiny-llama"))
        print("| chain | ms/step median | p10 | p90 | ms per hop | client CPU ms/step | servers CPU ms/step |")
        print("|---|---|---|---|---|---|---|")
        for spans, push in ((["0:1"], True), (["0:1", "1:2", "2:3"], True), (["0:1", "1:2", "2:3"], False)):
            label = f"{len(spans)} server(s)" + ("" if push or len(spans) == 1 else ", no push")
            print(f"measuring {label}", file=sys.stderr, flush=True)
            times, client, servers = measure(path, spans, min(args.steps, 480), push)
            ms = sorted(t * 1000 for t in times)
            med = statistics.median(ms)
            print(f"| {label} | {med:.2f} | {ms[len(ms) // 10]:.2f} | {ms[9 * len(ms) // 10]:.2f} "
                  f"| {med / len(spans):.2f} | {client * 1000:.2f} | {servers * 1000:.2f} |", flush=True)


if __name__ == "__main__":
    main()
