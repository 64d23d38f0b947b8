"""Aggregate decode throughput of 1, 4 and 16 concurrent sessions on one server, and KV memory.

    python benchmarks/concurrent_sessions.py [--sessions 1 4 16] [--tokens 32] [--prompt-tokens 8] [--threads 2]
                                             [--dtype float32] [--quant none]

One real `petald serve` process holds all 30 blocks of SmolLM2. One client
process runs N sessions at once over libp2p (N trio tasks on its node). Each
session sends an 8-token prompt (--prompt-tokens), then --tokens single-token decode steps. To
measure the server and not the client, the steps are teacher-forced (the
embeddings of a fixed token sequence, computed before timing) instead of
running the LM head and sampling in the client. Aggregate tokens/s = N x
--tokens / wall time of the decode phase; the ratio to 1 session is the
continuous-batching gain. All session counts run in one invocation against the
same server, round-robin --rounds times; each reports its median round.

The KV section needs no server: it opens sessions in a pool built exactly as a
server builds it (``PagedKVCache.from_budget``, as ``BlockSpan.new_pool`` calls it) until admission refuses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import trio  # noqa: E402

from petald.cli.local_swarm import LocalSwarm  # noqa: E402
from petald.kernels.models.dims import ModelDims  # noqa: E402
from petald.kernels.paged_kv_cache import DEFAULT_PAGE_SIZE, CacheFullError, PagedKVCache  # noqa: E402
from petald.kernels.sources.open_source import open_source  # noqa: E402
from petald.p2pnode.client.distributed_model import DistributedModel  # noqa: E402
from petald.p2pnode.client.inference_session import InferenceSession  # noqa: E402

PROMPT = [504, 3575, 282, 4649, 314, 253, 1345, 30]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def decode_concurrently(model: DistributedModel, sessions: int, tokens: int,
                        prompt_tokens: int = len(PROMPT)) -> float:
    """Seconds for ``sessions`` sessions to each run ``tokens`` decode steps at the same time, after a
    prompt of ``prompt_tokens`` (PROMPT repeated): the decode steps attend over prompt + steps so far."""
    gen = torch.Generator().manual_seed(0)
    prompt = (PROMPT * (prompt_tokens // len(PROMPT) + 1))[:prompt_tokens]
    prompts = [model.head.embed(torch.tensor([prompt])) for _ in range(sessions)]
    steps = [[model.head.embed(torch.randint(0, 49152, (1, 1), generator=gen)) for _ in range(tokens)]
             for _ in range(sessions)]

    routes = [model.route() for _ in range(sessions)]  # route() blocks on the node's thread: not inside run()

    async def run() -> float:
        opened = [InferenceSession(model.node.host, route, model.identity, 1, prompt_tokens + tokens,
                                   dataclasses.replace(model.options, step_timeout=300.0)) for route in routes]
        try:
            async with trio.open_nursery() as nursery:
                for s, prompt in zip(opened, prompts, strict=True):
                    nursery.start_soon(_open_and_prefill, s, prompt)
            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for s, inputs in zip(opened, steps, strict=True):
                    nursery.start_soon(_decode, s, inputs)
            return time.perf_counter() - started
        finally:
            for s in opened:
                await s.close()

    return model.node.call(run)


async def _open_and_prefill(session: InferenceSession, prompt: torch.Tensor) -> None:
    await session.open()
    await session.step(prompt)


async def _decode(session: InferenceSession, inputs: list[torch.Tensor]) -> None:
    for hidden in inputs:
        await session.step(hidden)


def kv_capacity(source, budget_tokens: int, max_lengths: list[int]) -> list[dict]:
    """Per-session KV bytes and how many sessions a --cache-tokens budget admits, for float32 and bfloat16."""
    dims = ModelDims.of(source.config)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        # The pool a server holding every block builds (torch.empty: nothing is committed here).
        pool = PagedKVCache.from_budget(budget_tokens, source.identity.num_blocks, DEFAULT_PAGE_SIZE,
                                        dims.kv_heads, dims.head_dim, dtype, torch.device("cpu"))
        for max_length in max_lengths:
            admitted = []
            try:
                while True:
                    admitted.append(pool.open(1, max_length))
            except CacheFullError:
                pass
            pages = PagedKVCache.pages_for_tokens(1, max_length, DEFAULT_PAGE_SIZE)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "max_length": max_length,
                         "bytes_per_token": pool.bytes_per_token,
                         "kv_mib_per_session": pages * DEFAULT_PAGE_SIZE * pool.bytes_per_token / 2**20,
                         "sessions_admitted": len(admitted),
                         "pool_gib": pool.num_pages * DEFAULT_PAGE_SIZE * pool.bytes_per_token / 2**30})
            for s in admitted:
                pool.close(s)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=len(PROMPT),
                        help="each session's prompt length: how many keys its decode steps attend over")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the server")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the server's compute dtype")
    parser.add_argument("--quant", default="none", choices=["none", "int8", "int4"])
    parser.add_argument("--cache-tokens", type=int, default=1 << 20, help="KV budget for the capacity table")
    parser.add_argument("--out", default="benchmarks/results/concurrent_sessions.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the client only embeds; leave the cores to the server

    source = open_source(None)
    results: dict = {"model": source.identity.model_id, "tokens": args.tokens, "prompt_tokens": args.prompt_tokens,
                     "threads": args.threads,
                     "dtype": args.dtype, "quant": args.quant, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "torch": torch.__version__, "throughput": []}
    extra = ["--threads", str(args.threads), "--dtype", args.dtype, "--quant", args.quant, "--max-length", "2048"]
    with LocalSwarm(["0:30"], extra_args=extra, log=say) as swarm:
        with DistributedModel(swarm.addresses, source) as model:
            decode_concurrently(model, 1, 4)  # warm up connections and the server
            seconds: dict[int, list[float]] = {n: [] for n in args.sessions}
            for round_ in range(args.rounds):
                for n in args.sessions:
                    say(f"round {round_ + 1}/{args.rounds}: {n} concurrent sessions x {args.tokens} decode steps")
                    seconds[n].append(decode_concurrently(model, n, args.tokens, args.prompt_tokens))
    for n, runs in seconds.items():
        median = statistics.median(runs)
        results["throughput"].append({"sessions": n, "seconds": median, "runs": runs,
                                      "tokens_per_s": n * args.tokens / median})
    base = results["throughput"][0]["tokens_per_s"] / results["throughput"][0]["sessions"]
    results["kv"] = kv_capacity(source, args.cache_tokens, [512, 2048, 8192])

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"Aggregate decode throughput, one server (0:30, {args.threads} threads, {args.dtype}, "
          f"quant {args.quant}):\n")
    print("| sessions | aggregate tokens/s | ms per decode round | vs 1 session |")
    print("|---|---|---|---|")
    for r in results["throughput"]:
        print(f"| {r['sessions']} | {r['tokens_per_s']:.1f} | {1000 * r['seconds'] / args.tokens:.1f} | "
              f"{r['tokens_per_s'] / base:.2f}x |")
    print(f"\nKV cache per session and sessions admitted by --cache-tokens {args.cache_tokens} "
          f"(page size {DEFAULT_PAGE_SIZE}, all {source.identity.num_blocks} blocks):\n")
    print("| KV dtype | bytes per token | max_length | KV MiB per session | sessions admitted | pool GiB |")
    print("|---|---|---|---|---|---|")
    for r in results["kv"]:
        print(f"| {r['dtype']} | {r['bytes_per_token']} | {r['max_length']} | {r['kv_mib_per_session']:.1f} | "
              f"{r['sessions_admitted']} | {r['pool_gib']:.2f} |")


if __name__ == "__main__":
    main()
