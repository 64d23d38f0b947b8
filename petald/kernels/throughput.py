"""How fast a span runs on this device: measured once at start, cached per device and model.

Both figures are per block (the span's rate times its length), so servers holding spans
of different lengths compare, and a client can price a hop as blocks / rate.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from petald.kernels.cache_dir import petald_cache_dir, read_json, write_json
from petald.kernels.span import BlockSpan

PREFILL_CHUNK = 128


@dataclass(frozen=True)
class SpanThroughput:
    inference_rps: float  # single-token decode steps per second through one block
    forward_tps: float  # tokens per second through one block, in chunks of PREFILL_CHUNK


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"


def measure_throughput(span: BlockSpan, seconds: float = 1.0,
                       progress: Callable[[str, int, int], None] | None = None) -> SpanThroughput:
    """Time decode steps and prefill chunks of ``span`` for about ``seconds`` in all.

    ``progress(text, done, total)`` hears of each finished part (a sentence) and, in between,
    of the time spent in percent (``text`` empty, ``total`` 100).
    """
    blocks = span.end - span.start
    # A model served for fewer positions than a chunk (Phi-3's longrope: its original length) is timed on
    # what it serves; the rate is per token either way.
    chunk = min(PREFILL_CHUNK, span.max_positions)
    hidden = torch.randn(1, chunk, span.hidden_size, generator=torch.Generator().manual_seed(0))
    token = hidden[:, :1]

    def timed(run: Callable[[], None], budget: float, what: str, offset: float) -> float:
        run()  # warm-up: first calls allocate and pick kernels
        count, began, shown = 0, time.perf_counter(), -1
        while True:
            run()
            count += 1
            elapsed = time.perf_counter() - began
            percent = min(100, int(100 * (offset + min(elapsed, budget)) / seconds))
            if progress is not None and percent != shown:
                progress("", percent, 100)
                shown = percent
            if elapsed >= budget and count >= 3:
                if progress is not None:
                    progress(f"measuring throughput: {what} done ({count} runs in {elapsed:.2f} s)", percent, 100)
                return count / elapsed

    steps_cache = span.new_cache(1, min(4096, span.max_positions))
    span.forward(hidden[:, :16], steps_cache)

    def one_step() -> None:
        if steps_cache.length + 1 > steps_cache.max_length:
            steps_cache.length = 16
        span.forward(token, steps_cache)

    def one_chunk() -> None:
        span.forward(hidden, span.new_cache(1, chunk))

    steps_per_s = timed(one_step, seconds / 2, "inference steps", 0.0)
    chunks_per_s = timed(one_chunk, seconds / 2, "forward passes", seconds / 2)
    return SpanThroughput(inference_rps=steps_per_s * blocks, forward_tps=chunks_per_s * chunk * blocks)


# Part of the cache key: raise it when a kernel change moves the speed of a configuration, so that
# servers measure again instead of announcing figures of the old code (2: prepacked bfloat16 weights;
# 3: petald's own int4 kernel; 4: decode attention in C; 5: AVX2 variants of petald's kernels;
# 6: petald's own int8 kernel).
KERNELS_REVISION = 6


def kernel_of(span: BlockSpan, quant: str) -> str:
    """``quant``, with which of petald's C kernels (and which variant: avx512, avx2) and torch's serve it where
    that is chosen per process: for int4 and int8 the matmul (kernels/native/int4_native.py, int8_native.py;
    petald's and torch's differ in speed by up to 2.2x), and for every quantization decode attention
    (kernels/native/decode_attention.py)."""
    label = quant
    if quant in ("int4", "int8"):
        kernel = getattr(span.blocks[0].qkv, "kernel", None)
        label = f"{quant} petald {kernel.isa} kernel" if kernel is not None else f"{quant} torch kernel"
    attention = span.blocks[0].native_decode
    return f"{label}, {attention.isa if attention is not None else 'torch'} attention"


def cached_throughput(span: BlockSpan, fingerprint: str, quant: str,
                      measure: Callable[[], SpanThroughput],
                      kernels_revision: int = KERNELS_REVISION) -> tuple[SpanThroughput, bool]:
    """``measure()`` unless this device, model, dtype and quantization were measured before (by these kernels:
    for int4, by the same one of petald's and torch's; by the same ``kernels_revision``).

    Returns the figures and whether they came from the cache.
    """
    key = "|".join([device_name(span.device), fingerprint, str(span.dtype), kernel_of(span, quant), torch.__version__,
                    f"kernels {kernels_revision}"])
    path = petald_cache_dir() / "throughput.json"
    cache = read_json(path)
    cache = cache if isinstance(cache, dict) else {}
    entry = cache.get(key)
    if isinstance(entry, dict):
        try:
            return SpanThroughput(**entry), True
        except TypeError:
            pass  # written by another version: measure again
    figures = measure()
    cache[key] = asdict(figures)
    write_json(path, cache)
    return figures, False
