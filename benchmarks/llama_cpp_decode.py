"""llama.cpp decode speed on the same GGUF petald loads, as the yardstick for petald's executor.

    bash scripts/dev bench-env          # once: llama-cpp-python into the venv (benchmarks only)
    python benchmarks/llama_cpp_decode.py [--tokens 64] [--threads 1 2] [--model PATH]

llama-cpp-python is not a petald dependency; this script is the only user. It
decodes greedily after a short prompt, one token per llama_decode call (batch 1,
like a petald decode step), and reports the median ms per decoded token for
each thread count. The default model is the embedded SmolLM2-135M-Instruct GGUF.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

try:
    import llama_cpp
except ImportError:
    sys.exit("llama_cpp is not installed: run `bash scripts/dev bench-env` first (benchmark environment only)")

from petald.kernels.sources.open_source import default_gguf_path

PROMPT = "The capital of France is"


def decode(model_path: str, threads: int, tokens: int) -> tuple[list[float], list[int]]:
    """Per-token wall times (s) of ``tokens`` greedy decode steps, and the tokens produced."""
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=512, n_batch=64, n_threads=threads,
                          n_threads_batch=threads, verbose=False, seed=0)
    try:
        ids = llm.tokenize(PROMPT.encode(), add_bos=True)
        llm.reset()
        llm.eval(ids)  # the prompt: not timed
        vocab = llm.n_vocab()
        times, out = [], []
        for _ in range(tokens):
            t0 = time.perf_counter()
            # Greedy from the last position's logits (llama.cpp's own buffer: the high-level
            # API keeps no logits unless logits_all), then one decode step for that token.
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
            nxt = int(logits.argmax())
            llm.eval([nxt])
            times.append(time.perf_counter() - t0)
            out.append(nxt)
        return times, out
    finally:
        llm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    path = args.model or str(default_gguf_path())
    print(f"llama-cpp-python {llama_cpp.__version__}, {os.path.basename(path)}, {args.tokens} greedy tokens after "
          f"{PROMPT!r}, {platform.machine()} with {os.cpu_count()} cores", file=sys.stderr)
    print("| threads | ms/token (median) | p90 | tokens/s |")
    print("|---|---|---|---|")
    for threads in args.threads:
        times, out = decode(path, threads, args.tokens)
        ms = sorted(t * 1000 for t in times[2:])  # the first steps warm caches
        med = statistics.median(ms)
        print(f"| {threads} | {med:.2f} | {ms[int(0.9 * (len(ms) - 1))]:.2f} | {1000 / med:.1f} |", flush=True)
        print(f"  first tokens ({threads} threads): {out[:12]}", file=sys.stderr)


if __name__ == "__main__":
    main()
