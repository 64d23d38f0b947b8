"""Decode speed through 2 and 3 local server processes against the same blocks in one process.

    python benchmarks/pipeline_overhead.py [--tokens 64] [--threads 1] [--model PATH] [--quant none|int8|int4]
                                           [--dtype float32|bfloat16] [--head-quant none|bf16|int8|int4]

All configurations run in one invocation, one after another, so the ratios
compare like with like on a noisy shared machine. Through servers, each swarm
decodes twice: with pushes (each server hands its output straight to the next,
the default) and without (every hop goes server -> client -> next server).
Per-hop overhead is (ms/token through k servers - ms/token in one process) / k.
"""

from __future__ import annotations

import argparse
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

from petald.cli.local_swarm import LocalSwarm, even_spans  # noqa: E402
from petald.kernels.client_head import ClientHead  # noqa: E402
from petald.kernels.sources.open_source import open_source  # noqa: E402
from petald.kernels.span import BlockSpan  # noqa: E402
from petald.p2pnode.client.distributed_model import DistributedModel  # noqa: E402

PROMPT = [504, 3575, 282, 4649, 314, 253, 1345, 30]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def decode_local(source, tokens: int, dtype: str, quant: str, head_quant: str) -> list[float]:
    n = source.identity.num_blocks
    span = BlockSpan(source, 0, n, getattr(torch, dtype), torch.device("cpu"), quant=quant)
    head = ClientHead(source, quant=head_quant)
    cache = span.new_cache(1, len(PROMPT) + tokens + 1)
    ids = torch.tensor([PROMPT])
    hidden = span.forward(head.embed(ids), cache)
    times = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        nxt = head.logits(hidden[:, -1]).argmax(-1)
        hidden = span.forward(head.embed(nxt[:, None]), cache)
        times.append(time.perf_counter() - t0)
    return times


def decode_remote(model: DistributedModel, tokens: int) -> tuple[list[float], int]:
    """Per-token times, and how many hop steps got their input by push."""
    ids = torch.tensor([PROMPT])
    times = []
    with model.inference_session(1, len(PROMPT) + tokens + 1) as session:
        hidden = model.node.call(session.step, model.head.embed(ids))
        for _ in range(tokens):
            t0 = time.perf_counter()
            nxt = model.head.logits(hidden[:, -1]).argmax(-1)
            hidden = model.node.call(session.step, model.head.embed(nxt[:, None]))
            times.append(time.perf_counter() - t0)
    return times, session.pushed_steps


def summarise(times: list[float]) -> dict:
    ms = sorted(t * 1000 for t in times[2:])  # the first steps warm caches and connections
    return {"ms_per_token_median": statistics.median(ms), "ms_per_token_p90": ms[int(0.9 * (len(ms) - 1))],
            "steps_per_s": 1000 / statistics.median(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every process")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the blocks' compute dtype, here and in servers")
    parser.add_argument("--quant", default="none", choices=["none", "int8", "int4"], help="weights, here and in servers")
    parser.add_argument("--head-quant", default="none", choices=["none", "bf16", "int8", "int4"],
                        help="the client's LM head, in one process and through servers alike")
    parser.add_argument("--out", default="benchmarks/results/pipeline_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source = open_source(args.model)
    n = source.identity.num_blocks
    results: dict = {"model": source.identity.model_id, "tokens": args.tokens, "threads": args.threads,
                     "dtype": args.dtype, "quant": args.quant, "head_quant": args.head_quant,
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__}
    say(f"one process: decoding {args.tokens} tokens of {source.identity.model_id}")
    results["local"] = summarise(decode_local(source, args.tokens, args.dtype, args.quant, args.head_quant))

    for servers in (2, 3):
        spans = even_spans(n, servers)
        say(f"{servers} servers ({', '.join(spans)}): starting processes")
        extra = ["--threads", str(args.threads), "--dtype", args.dtype, "--quant", args.quant]
        with LocalSwarm(spans, args.model, extra_args=extra, log=say) as swarm:
            for push in (True, False):
                with DistributedModel(swarm.addresses, source, head_quant=args.head_quant, push=push) as model:
                    say(f"{servers} servers{'' if push else ', no push'}: decoding {args.tokens} tokens")
                    times, pushed = decode_remote(model, args.tokens)
                    r = summarise(times)
                    r["pushed_hop_steps"] = pushed
                r["ratio_to_local"] = results["local"]["ms_per_token_median"] / r["ms_per_token_median"]
                r["per_hop_overhead_ms"] = ((r["ms_per_token_median"] - results["local"]["ms_per_token_median"])
                                            / servers)
                results[f"{servers}_servers" + ("" if push else "_no_push")] = r

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("| configuration | ms/token (median) | p90 | steps/s | vs one process | per-hop overhead | pushed hop steps |")
    print("|---|---|---|---|---|---|---|")
    loc = results["local"]
    print(f"| one process | {loc['ms_per_token_median']:.1f} | {loc['ms_per_token_p90']:.1f} | {loc['steps_per_s']:.1f} "
          "| 1.00x | - | - |")
    for servers in (2, 3):
        for suffix, label in (("", ""), ("_no_push", ", no push")):
            r = results[f"{servers}_servers{suffix}"]
            print(f"| {servers} server processes{label} | {r['ms_per_token_median']:.1f} | {r['ms_per_token_p90']:.1f} | "
                  f"{r['steps_per_s']:.1f} | {r['ratio_to_local']:.2f}x | {r['per_hop_overhead_ms']:.2f} ms "
                  f"| {r['pushed_hop_steps']} |")


if __name__ == "__main__":
    main()
