"""What the local API costs per token over calling DistributedModel in one's own process.

    python benchmarks/api_overhead.py [--tokens 64] [--rounds 3]

One server process holds all 30 blocks of SmolLM2-135M-Instruct (1 torch thread) and serves
the API on a Unix socket; a client-only ``petald daemon`` serves it on another. For each
path the same greedy chat answer runs ``--rounds`` times and the time between streamed tokens
is taken (median over tokens 3..N of every round), plus the time to the first token:

- in-process: ``DistributedModel.generate`` with a streamer, in this process;
- daemon: the ``openai`` package, chat completions streamed, over the daemon's socket (its DistributedModel
  runs in the daemon, a process of its own, like the in-process client);
- server: the same over the server's own socket (the API's DistributedModel shares the
  server's process and cores with the blocks).

The first request to each API also creates its DistributedModel (joining the swarm, loading
embeddings and the LM head): reported apart as "first request".
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import openai  # noqa: E402

from petald.cli.local_swarm import LocalSwarm  # noqa: E402
from petald.cli.text_generation import chat_prompt_ids  # noqa: E402
from petald.kernels.sampling import end_of_sequence_ids  # noqa: E402
from petald.p2pnode.client.distributed_model import DistributedModel  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps[2:], stamps[3:], strict=False)]


def through_api(socket: Path, tokens: int) -> tuple[float, list[float], int]:
    client = openai.OpenAI(api_key="-", base_url="http://petald/v1",
                           http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), timeout=300))
    model_id = client.models.list().data[0].id
    began, stamps = time.perf_counter(), []
    for chunk in client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=tokens, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    return stamps[0] - began, gaps(stamps), len(stamps)


def in_process(model: DistributedModel, tokens: int) -> tuple[float, list[float], int]:
    # The prompt and the end-of-sequence ids as petald chat and the API take them.
    ids = chat_prompt_ids(model.tokenizer, [{"role": "user", "content": PROMPT}])
    eos = end_of_sequence_ids(model.config.eos_token_id, model.tokenizer.eos_token_id)
    stamps: list[float] = []
    began = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, eos_token_id=eos, streamer=lambda _: stamps.append(time.perf_counter()))
    return stamps[0] - began, gaps(stamps), len(stamps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="petald-api-bench-"))
    server_socket, daemon_socket = root / "server.sock", root / "daemon.sock"
    with LocalSwarm(["0:30"], extra_args=["--threads", "1", "--socket", str(server_socket)]) as swarm:
        daemon = subprocess.Popen([sys.executable, "-m", "petald.cli.main", "daemon", "--initial-peers",
                                   swarm.addresses[0], "--socket", str(daemon_socket)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
        try:
            assert daemon.stdout is not None
            for line in daemon.stdout:
                if "local API on" in line:
                    break
            results: dict[str, tuple[list[float], list[float]]] = {}
            first: dict[str, float] = {}
            with DistributedModel(model=None, initial_peers=swarm.addresses[:1]) as model:
                runs = {"in-process": lambda: in_process(model, args.tokens),
                        "daemon (openai, stream)": lambda: through_api(daemon_socket, args.tokens),
                        "server (openai, stream)": lambda: through_api(server_socket, args.tokens)}
                for name, run in runs.items():
                    first[name] = run()[0]  # warm-up; for the APIs it creates their DistributedModel
                for _ in range(args.rounds):
                    for name, run in runs.items():  # interleaved, so that noise hits every path alike
                        ttft, between, count = run()
                        results.setdefault(name, ([], []))[0].append(ttft)
                        results[name][1].extend(between)
        finally:
            daemon.terminate()
            daemon.wait(30)
    base = statistics.median(results["in-process"][1])
    print(f"{args.tokens} greedy tokens x {args.rounds} rounds, SmolLM2-135M (30 blocks, one server, 1 thread)\n")
    print("| path | first request (s) | time to first token (ms) | ms/token (median) | vs in-process |")
    print("|---|---|---|---|---|")
    for name, (ttfts, between) in results.items():
        ms = statistics.median(between) * 1000
        print(f"| {name} | {first[name]:.2f} | {statistics.median(ttfts) * 1000:.0f} | {ms:.1f} | "
              f"{ms - base * 1000:+.1f} ms |")


if __name__ == "__main__":
    main()
