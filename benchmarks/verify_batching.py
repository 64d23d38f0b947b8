"""A speculative verify step batched with other sessions' decode steps, on one server's span.

    python benchmarks/verify_batching.py [--sessions 1,4,16] [--verify 9] [--context 256] [--blocks 10]

A server's executor runs every step that is ready in one ``BlockSpan.forward_batch``. A batch of
one-token decode steps runs its attention in petald's C kernel; a batch holding a longer step (a
prefill chunk, or a verify step of K + 1 tokens) runs torch's ops for every segment. This measures,
on SmolLM2-135M's first ``--blocks`` blocks (float32, one thread), the time of one turn of:

- ``decode``: N sessions' decode steps alone (the C kernel where this CPU has it),
- ``mixed``: the same N decode steps plus one verify step of ``--verify`` tokens, in one forward,
- ``apart``: the N decode steps, then the verify step, as two forwards (no batching),

each session at ``--context`` positions, repeated in alternation, medians. ``mixed - decode`` is
what the verify step adds to the other sessions' turn; ``apart - mixed`` is what batching saves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from petald.kernels.sources.open_source import open_source  # noqa: E402
from petald.kernels.span import BlockSpan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--sessions", default="1,4,16")
    parser.add_argument("--verify", type=int, default=9, help="tokens of the verify step (K + 1)")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = open_source(args.model)
    span = BlockSpan(source, 0, args.blocks, torch.float32, torch.device("cpu"))
    kernel = span.blocks[0].native_decode
    print(f"{source.identity.model_id}, blocks 0:{args.blocks}, decode attention: "
          f"{kernel.isa if kernel is not None else 'torch'}; load average {os.getloadavg()[0]:.2f}")
    print("| sessions | decode ms | mixed ms | apart ms | verify adds | batching saves |")
    print("|---|---|---|---|---|---|")
    for n in (int(x) for x in args.sessions.split(",")):
        d, m, a = turn_times(span, n, args)
        print(f"| {n} | {d:.2f} | {m:.2f} | {a:.2f} | {m - d:+.2f} | {a - m:+.2f} |")


def turn_times(span: BlockSpan, n: int, args: argparse.Namespace) -> tuple[float, float, float]:
    """Median ms of a turn of n decode steps alone, with the verify step batched, and the two apart."""
    hidden = span.hidden_size
    length = args.context + args.verify + 8
    pool = span.new_pool((n + 1) * (length + 16) * args.blocks)  # whole pages per session
    caches = [pool.open(1, length) for _ in range(n + 1)]
    for cache in caches:
        span.forward(torch.randn(1, args.context, hidden), cache)
    decoders, verifier = caches[:n], caches[n]
    one, many = torch.randn(1, 1, hidden), torch.randn(1, args.verify, hidden)

    def decode() -> None:
        span.forward_batch([(one, c) for c in decoders])

    def mixed() -> None:
        span.forward_batch([*((one, c) for c in decoders), (many, verifier)])

    def apart() -> None:
        decode()
        span.forward_batch([(many, verifier)])

    times: dict[str, list[float]] = {"decode": [], "mixed": [], "apart": []}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, run in (("decode", decode), ("mixed", mixed), ("apart", apart)):
                began = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - began) * 1000)
                for c in caches:  # back to the same context: every turn sees the same lengths
                    pool.truncate(c, args.context)
    for cache in caches:
        pool.close(cache)
    return tuple(statistics.median(times[k]) for k in ("decode", "mixed", "apart"))


if __name__ == "__main__":
    main()
