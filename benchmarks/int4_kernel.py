"""petald's own int4 matmul (kernels/native/int4_native.py), each of its variants this CPU runs (AVX512-BF16,
AVX2 with FMA: forced in turn through PETALD_CPU_KERNELS), against torch's _weight_int4pack_mm_for_cpu.

    python benchmarks/int4_kernel.py [--threads 1] [--rows 1 2 4 8 16 64 256]

All kernels hold the same int4 weights (Int4Linear, groups of 32) for 30 blocks of
SmolLM2's four fused projections (q/k/v 960x576, o 576x576, gate/up 3072x576, down
576x1536), random values. Each measurement runs every block's four matmuls in turn, so
that, as in decoding, a block's weights have left the caches before it runs again; it
reports microseconds per block (best of 3 passes) at each row count, side by side, and the largest
difference between petald's kernels' and torch's outputs relative to the largest output.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from petald.kernels.native.native_library import PROCESS_LIBRARY, SWITCH, CpuKernelError
from petald.kernels.quant import Int4Linear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) of SmolLM2's fused projections


def per_block_us(blocks: list[list[Int4Linear]], inputs: list[torch.Tensor], repeats: int) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            for block in blocks:
                for layer, x in zip(block, inputs, strict=True):
                    layer(x)
        best = min(best, (time.perf_counter() - t0) / repeats / len(blocks))
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 256])
    parser.add_argument("--blocks", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    weights = [[torch.randn(n, k, generator=gen) * 0.02 for n, k in SHAPES] for _ in range(args.blocks)]
    kernels = {"torch": [[Int4Linear(w, None, native=False) for w in block] for block in weights]}
    for isa in ("avx512", "avx2"):
        os.environ[SWITCH] = isa
        try:
            kernels[f"petald {isa}"] = [[Int4Linear(w, None, native=True) for w in block] for block in weights]
        except CpuKernelError as exc:
            print(f"not measured: {exc}", file=sys.stderr)
        finally:
            os.environ.pop(SWITCH)
    if len(kernels) == 1:
        sys.exit("petald's int4 kernel is not available here (no C compiler, or a CPU with neither AVX512-BF16 nor "
                 "AVX2 and FMA): nothing to compare")
    ours = [name for name in kernels if name != "torch"]
    print(f"{args.blocks} blocks, {args.threads} thread(s), torch {torch.__version__}, CPU features: "
          f"{', '.join(sorted(PROCESS_LIBRARY.cpu_features()))}\n")
    print("| rows | torch: us per block | " + " | ".join(f"{name}: us per block | speed-up" for name in ours)
          + " | max relative difference |")
    print("|---|---|" + "---|---|" * len(ours) + "---|")
    with torch.inference_mode():
        for rows in args.rows:
            inputs = [torch.randn(rows, k, generator=gen) for _, k in SHAPES]
            repeats = max(2, 40 // rows)
            us = {name: per_block_us(blocks, inputs, repeats) for name, blocks in kernels.items()}
            diff = max(((a(x) - b(x)).abs().max() / b(x).abs().max()).item() for name in ours
                       for a, b, x in zip(kernels[name][0], kernels["torch"][0], inputs, strict=True))
            cells = " | ".join(f"{us[name]:.0f} | {us['torch'] / us[name]:.2f}x" for name in ours)
            print(f"| {rows} | {us['torch']:.0f} | {cells} | {diff:.1e} |", flush=True)

if __name__ == "__main__":
    main()
