"""Batched decode steps through a mixture-of-experts span (Mixtral's layout) against the dense span
of the same shape, in one process.

    python benchmarks/moe_decode.py [--threads 1] [--sessions 1 4 16] [--quant none int8]

Random weights in SmolLM2's dimensions (hidden 576, MLP 1536, 9 query and 3 key/value heads of 64),
8 blocks: once as Mixtral with 8 experts, 2 a token, and once as Mistral (one MLP), saved as Hugging
Face directories in a temporary folder. For each session count, that many sessions are prefilled with
64 tokens, then decode steps of all of them run as one batched forward (``BlockSpan.forward_batch``),
alternating the two spans; it reports milliseconds per batched step (the median of --steps) and the
experts the step ran per block (each chosen expert runs once over all its tokens: kernels/moe.py).
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

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from petald.kernels.sources.open_source import open_source  # noqa: E402
from petald.kernels.span import BlockSpan  # noqa: E402

SHAPE = dict(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
             num_key_value_heads=3, head_dim=64, max_position_embeddings=2048, sliding_window=None)


def save(folder: Path, family: str, **extra) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **SHAPE, **extra), dtype=torch.float32)
    model.save_pretrained(folder / family)
    return str(folder / family)


class Counted:
    """An expert's linear layer that counts its calls (what a step ran)."""

    calls = 0

    def __init__(self, linear):
        self.linear = linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        Counted.calls += 1
        return self.linear(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--quant", nargs="+", default=["none", "int8"])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        paths = {"moe": save(Path(folder), "mixtral", num_local_experts=8, num_experts_per_tok=2),
                 "dense": save(Path(folder), "mistral")}
        sources = {name: open_source(path) for name, path in paths.items()}
        print(f"8 blocks in SmolLM2's dimensions, float32 activations, {args.threads} thread(s), torch {torch.__version__}\n")
        print("| blocks | sessions | dense: ms per step | 8 experts, top 2: ms per step | ratio | experts run per block |")
        print("|---|---|---|---|---|---|")
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for quant in args.quant:
                spans = {name: BlockSpan(s, 0, 8, torch.float32, torch.device("cpu"), quant=quant)
                         for name, s in sources.items()}
                for block in spans["moe"].blocks:
                    for expert in block.moe.experts:
                        expert.gate_up = Counted(expert.gate_up)
                for sessions in args.sessions:
                    print(f"{quant}: {sessions} sessions", file=sys.stderr, flush=True)
                    prompt = torch.randn(sessions, 64, 576, generator=gen) * 0.1
                    caches = {}
                    for name, span in spans.items():
                        pool = span.new_pool(sessions * (64 + args.steps + 16) * 8)
                        caches[name] = [pool.open(1, 64 + args.steps + 2) for _ in range(sessions)]
                        for s, cache in enumerate(caches[name]):
                            span.forward(prompt[s : s + 1], cache)
                    times: dict[str, list[float]] = {name: [] for name in spans}
                    ran = []
                    for _ in range(args.steps):
                        token = torch.randn(sessions, 1, 1, 576, generator=gen) * 0.1
                        Counted.calls = 0
                        for name, span in spans.items():
                            t0 = time.perf_counter()
                            span.forward_batch([(token[s], c) for s, c in enumerate(caches[name])])
                            times[name].append(time.perf_counter() - t0)
                        ran.append(Counted.calls / 8)
                    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
                    print(f"| {quant} | {sessions} | {ms['dense']:.2f} | {ms['moe']:.2f} | "
                          f"{ms['moe'] / ms['dense']:.2f}x | {statistics.median(ran):.1f} of 8 |", flush=True)


if __name__ == "__main__":
    main()
