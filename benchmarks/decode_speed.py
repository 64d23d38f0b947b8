"""Single-process decode speed of SmolLM2: petald's executor (each dtype and quant) against
transformers' own model and llama.cpp on the same GGUF.

    python benchmarks/decode_speed.py [--tokens 64] [--threads 2] [--rounds 2]

Every configuration decodes the same 8-token prompt greedily for --tokens steps,
batch 1; a step is LM head + argmax + embedding + all 30 blocks (what one
generated token costs). The configurations run round-robin --rounds times in
one invocation and each reports the median over all its steps after the first
two of a round, so the ratios compare like with like on a noisy machine.
"head=" is the client's LM head (ClientHead(quant=...)): at 49152 x 576 it is
the largest matrix a token touches, and llama.cpp reads it quantized too. int4 blocks
run petald's own kernel where it builds (kernels/native/int4_native.py);
"blocks=int4:torch" is the same weights through torch's _weight_int4pack_mm_for_cpu, for the
comparison. Decode steps' rotary, cache write and attention run in petald's C kernel
(kernels/native/decode_attention.py) where it builds; ":torch-attention" rows run them in
torch's ops instead (PETALD_NATIVE_ATTENTION=0). ":avx2" rows build blocks and head as on an
AVX2-only CPU (PETALD_CPU_KERNELS=avx2: petald's AVX2 kernels, no native bfloat16, so head=bf16
keeps float32); torch's own kernels (MKL, oneDNN) still use whatever this CPU has.
--configs SUBSTRING ... keeps only petald's configurations whose name contains one of them.
llama.cpp runs through llama-cpp-python if it is importable (a benchmark-only
install: pip install llama-cpp-python); otherwise it is skipped, and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from petald.kernels.client_head import ClientHead  # noqa: E402
from petald.kernels.native.native_library import PROCESS_LIBRARY  # noqa: E402
from petald.kernels.sources.open_source import default_gguf_path, open_source  # noqa: E402
from petald.kernels.span import BlockSpan  # noqa: E402

PROMPT = [504, 3575, 282, 4649, 314, 253, 1345, 30]
REFERENCE = "petald float32 blocks=none head=none"  # always run: the others' tokens are compared with its
# (compute dtype, block weights, LM head weights)
PETALD_CONFIGS = [("float32", "none", "none"), ("bfloat16", "none", "none"), ("bfloat16", "none", "bf16"),
                  ("float32", "int8", "none"), ("float32", "int4", "none"), ("float32", "int8", "int8"),
                  ("float32", "int4", "int8"), ("float32", "int4", "bf16"), ("float32", "int4:torch", "bf16"),
                  ("float32", "int4:torch-attention", "bf16"), ("float32", "none:torch-attention", "none"),
                  ("bfloat16", "int4", "bf16"), ("float32", "int4", "int4"), ("float32", "none:avx2", "none"),
                  ("float32", "int4:avx2", "none"), ("float32", "int4:avx2", "bf16"), ("float32", "int4:avx2", "int8")]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def petald_decoder(source, dtype: str, quant: str, head_quant: str) -> Callable[[int], tuple[list[float], list[int]]]:
    quant, _, variant = quant.partition(":")
    # Which of petald's C kernels give way to torch's or to their AVX2 variant, while the span and head are built
    # (each block and layer reads its setting then).
    overrides = {"torch": {"PETALD_NATIVE_INT4": "0"}, "torch-attention": {"PETALD_NATIVE_ATTENTION": "0"},
                 "avx2": {"PETALD_CPU_KERNELS": "avx2", "PETALD_NATIVE_INT4": "1"}}
    settings = {name: os.environ.get(name) for name in ("PETALD_NATIVE_INT4", "PETALD_NATIVE_ATTENTION",
                                                        "PETALD_CPU_KERNELS")}
    os.environ.update(overrides.get(variant, {}))
    try:
        span = BlockSpan(source, 0, source.identity.num_blocks, getattr(torch, dtype), torch.device("cpu"),
                         quant=quant)
        head = ClientHead(source, quant=head_quant)
    finally:
        for name, value in settings.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    @torch.inference_mode()
    def decode(tokens: int) -> tuple[list[float], list[int]]:
        cache = span.new_cache(1, len(PROMPT) + tokens + 1)
        hidden = span.forward(head.embed(torch.tensor([PROMPT])), cache)
        times, out = [], []
        for _ in range(tokens):
            t0 = time.perf_counter()
            nxt = head.logits(hidden[:, -1]).argmax(-1)
            hidden = span.forward(head.embed(nxt[:, None]), cache)
            times.append(time.perf_counter() - t0)
            out.append(int(nxt[0]))
        return times, out

    return decode


def transformers_decoder() -> Callable[[int], tuple[list[float], list[int]]]:
    from transformers import AutoModelForCausalLM

    path = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

    @torch.inference_mode()
    def decode(tokens: int) -> tuple[list[float], list[int]]:
        result = model(torch.tensor([PROMPT]), use_cache=True)
        times, out = [], []
        for _ in range(tokens):
            t0 = time.perf_counter()
            nxt = result.logits[:, -1].argmax(-1)
            result = model(nxt[:, None], past_key_values=result.past_key_values, use_cache=True)
            times.append(time.perf_counter() - t0)
            out.append(int(nxt[0]))
        return times, out

    return decode


def llama_cpp_decoder(threads: int) -> Callable[[int], tuple[list[float], list[int]]] | None:
    try:
        import llama_cpp
        import numpy as np
    except ImportError:
        return None
    # logits_all: llama-cpp-python 0.3 keeps no scores otherwise; decode steps are one token, so it costs nothing.
    llm = llama_cpp.Llama(model_path=str(default_gguf_path()), n_ctx=512, n_threads=threads, n_batch=64,
                          logits_all=True, verbose=False)

    def decode(tokens: int) -> tuple[list[float], list[int]]:
        llm.reset()
        llm.eval(PROMPT)
        times, out = [], []
        for _ in range(tokens):
            t0 = time.perf_counter()
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([nxt])
            times.append(time.perf_counter() - t0)
            out.append(nxt)
        return times, out

    return decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/decode_speed.json")
    parser.add_argument("--configs", nargs="+", default=[""], help="substrings of petald's configurations to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source = open_source(None)
    decoders: dict[str, Callable[[int], tuple[list[float], list[int]]]] = {}
    for dtype, quant, head_quant in PETALD_CONFIGS:
        name = f"petald {dtype} blocks={quant} head={head_quant}"
        if name != REFERENCE and not any(part in name for part in args.configs):
            continue
        say(f"loading {name}")
        decoders[name] = petald_decoder(source, dtype, quant, head_quant)
    say("loading transformers")
    decoders["transformers float32"] = transformers_decoder()
    llama = llama_cpp_decoder(args.threads)
    if llama is None:
        say("llama.cpp skipped: llama_cpp is not importable (pip install llama-cpp-python into the benchmark "
            "environment; it is not a petald dependency)")
    else:
        decoders["llama.cpp (llama-cpp-python)"] = llama

    times: dict[str, list[float]] = {name: [] for name in decoders}
    tokens: dict[str, list[int]] = {}
    for round_ in range(args.rounds):
        for name, decode in decoders.items():
            say(f"round {round_ + 1}/{args.rounds}: {name}")
            t, out = decode(args.tokens)
            times[name] += t[2:]
            tokens[name] = out

    medians = {name: 1000 * statistics.median(t) for name, t in times.items()}
    reference = tokens[REFERENCE]
    llama_ms = medians.get("llama.cpp (llama-cpp-python)")
    rows = []
    for name, ms in medians.items():
        same = sum(a == b for a, b in zip(tokens[name], reference, strict=True))
        rows.append({"config": name, "ms_per_token": ms, "tokens_per_s": 1000 / ms,
                     "vs_transformers": medians["transformers float32"] / ms,
                     "vs_llama_cpp": llama_ms / ms if llama_ms else None,
                     "greedy_tokens_same_as_petald_fp32": f"{same}/{len(reference)}"})
    results = {"tokens": args.tokens, "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows,
               "cpu_features": sorted(PROCESS_LIBRARY.cpu_features()),
               "llama_cpp": "measured" if llama_ms else "skipped: llama_cpp not importable"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"CPU features: {', '.join(results['cpu_features'])}; {results['machine']}; {args.threads} thread(s)\n")
    print("| configuration | ms/token (median) | tokens/s | vs transformers | vs llama.cpp | greedy tokens = petald fp32 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        vs_llama = f"{r['vs_llama_cpp']:.2f}x" if r["vs_llama_cpp"] else "skipped"
        print(f"| {r['config']} | {r['ms_per_token']:.1f} | {r['tokens_per_s']:.1f} | {r['vs_transformers']:.2f}x | "
              f"{vs_llama} | {r['greedy_tokens_same_as_petald_fp32']} |")


if __name__ == "__main__":
    main()
