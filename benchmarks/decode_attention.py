"""A decode step's attention in petald's C kernel (kernels/native/decode_attention.py), each variant this CPU
runs (AVX512F, AVX2 with FMA), against torch's ops.

    python benchmarks/decode_attention.py [--threads 1] [--sessions 1 4 16] [--context 128 1024] [--softcap 50]
        [--alibi]

SmolLM2's 30 blocks (the embedded GGUF, float32, or --quant int4) are built once with
PETALD_NATIVE_ATTENTION=0 and once per variant (PETALD_CPU_KERNELS=avx512, avx2; the int4 matmul
is then that variant's too). For each session count and context length, that many sessions
are prefilled to the context length, then decode steps of all of them run as one batched
forward through the whole span, alternating the builds; it reports milliseconds per
batched step (the median of --steps each) and the largest difference between torch's and
a variant's outputs relative to the largest output. The steps' keys and values are written and kept,
so each session's context grows by --steps during the measurement.

With --softcap CAP, a third build times torch's ops with every block's scores soft-capped at CAP
(kernels/softcap_attention.py, what a Gemma 2 block runs: the C kernel does not cap), on SmolLM2's
shapes: the cost of the fallback a soft-capped family takes, against plain torch's ops and the C kernel.
With --alibi, another times torch's ops with ALiBi's bias instead of rotary in every block (kernels/alibi.py,
what a BLOOM block runs: the C kernel adds no bias), likewise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from petald.kernels.alibi import alibi_slopes  # noqa: E402
from petald.kernels.native.native_library import PROCESS_LIBRARY, SWITCH, CpuKernelError  # noqa: E402
from petald.kernels.sources.open_source import open_source  # noqa: E402
from petald.kernels.span import BlockSpan  # noqa: E402


def build(source, quant: str, setting: dict[str, str]) -> BlockSpan:
    """The span, built with the environment ``setting`` (PETALD_* switches), which is then undone."""
    before = {name: os.environ.get(name) for name in setting}
    os.environ.update(setting)
    try:
        return BlockSpan(source, 0, source.identity.num_blocks, torch.float32, torch.device("cpu"), quant=quant)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--context", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quant", default="none", choices=["none", "int4"])
    parser.add_argument("--softcap", type=float, default=None)
    parser.add_argument("--alibi", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = open_source(None)
    print("loading the span once per kernel", file=sys.stderr, flush=True)
    spans = {"torch": build(source, args.quant, {"PETALD_NATIVE_ATTENTION": "0"})}
    for isa in ("avx512", "avx2"):
        try:
            spans[f"petald {isa}"] = build(source, args.quant, {SWITCH: isa, "PETALD_NATIVE_INT4": "1"})
        except CpuKernelError as exc:
            print(f"not measured: {exc}", file=sys.stderr)
    ours = [name for name, span in spans.items() if name != "torch" and span.blocks[0].native_decode]
    if args.softcap is not None:
        spans["capped"] = build(source, args.quant, {"PETALD_NATIVE_ATTENTION": "0"})
        for block in spans["capped"].blocks:
            block.softcap = args.softcap  # as a soft-capped family's block holds it
    if args.alibi:
        spans["alibi"] = build(source, args.quant, {"PETALD_NATIVE_ATTENTION": "0"})
        for block in spans["alibi"].blocks:
            block.alibi = alibi_slopes(block.n_heads)  # as an ALiBi family's block holds it (no rotary then)
    # The torch fallbacks measured, by build name: what each column says.
    fallbacks = {name: label for name, label in (("capped", "soft-capped"), ("alibi", "ALiBi")) if name in spans}
    if not ours:
        sys.exit("petald's decode attention is not available here (no C compiler, or a CPU with neither AVX512F "
                 "nor AVX2 and FMA): nothing to compare")
    hidden_size = source.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    print(f"SmolLM2, 30 blocks, float32 activations, blocks={args.quant}, {args.threads} thread(s), "
          f"torch {torch.__version__}, CPU features: {', '.join(sorted(PROCESS_LIBRARY.cpu_features()))}\n")
    print("| sessions | context | torch's ops: ms per step | "
          + " | ".join(f"{name}: ms per step | speed-up" for name in ours) + " | max relative difference |"
          + "".join(f" torch's ops, {label}: ms per step | against torch's ops |" for label in fallbacks.values()))
    print("|---|---|---|" + "---|---|" * len(ours) + "---|" + "---|---|" * len(fallbacks))
    with torch.inference_mode():
        for context in args.context:
            for sessions in args.sessions:
                print(f"{sessions} sessions at {context} tokens", file=sys.stderr, flush=True)
                prompt = torch.randn(sessions, context, hidden_size, generator=gen) * 0.1
                caches = {}
                for name, span in spans.items():
                    length = context + args.steps + 2
                    pool = span.new_pool(sessions * (length + 16) * source.identity.num_blocks)
                    caches[name] = [pool.open(1, length) for _ in range(sessions)]
                    for s, cache in enumerate(caches[name]):
                        span.forward(prompt[s : s + 1], cache)
                times: dict[str, list[float]] = {name: [] for name in spans}
                worst = 0.0
                for _ in range(args.steps):
                    token = torch.randn(sessions, 1, 1, hidden_size, generator=gen) * 0.1
                    outs = {}
                    for name, span in spans.items():
                        t0 = time.perf_counter()
                        outs[name] = span.forward_batch([(token[s], c) for s, c in enumerate(caches[name])])
                        times[name].append(time.perf_counter() - t0)
                    for name in ours:
                        for a, b in zip(outs["torch"], outs[name], strict=True):
                            worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
                ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
                cells = " | ".join(f"{ms[name]:.2f} | {ms['torch'] / ms[name]:.2f}x" for name in ours)
                extra = "".join(f" {ms[name]:.2f} | {ms[name] / ms['torch']:.2f}x |" for name in fallbacks)
                print(f"| {sessions} | {context} | {ms['torch']:.2f} | {cells} | {worst:.1e} |{extra}", flush=True)


if __name__ == "__main__":
    main()
