"""A large product of petald's matmul kernels, split by output tiles over torch's thread count.

The C calls release the GIL, so a small pool of this module's own threads runs the parts side by
side. A decode step of a few rows stays on the calling thread: waking another costs more than
its share of the work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

SPLIT_ROWS = 16  # products of this many rows or more are split over threads

_pools: dict[int, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def run_over_tiles(run: Callable[[int, int], None], tiles: int, rows: int) -> None:
    """``run(begin, end)`` for every tile in [0, tiles): at once, or in parts on several threads where
    the product has ``SPLIT_ROWS`` rows or more. Every part has finished when this returns."""
    threads = min(torch.get_num_threads(), tiles) if rows >= SPLIT_ROWS else 1
    if threads <= 1:
        run(0, tiles)
        return
    bounds = [tiles * i // threads for i in range(threads + 1)]
    pool = _thread_pool(threads - 1)
    parts = [pool.submit(run, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    try:
        run(bounds[0], bounds[1])
    finally:
        for part in parts:  # every part finishes before the caller's tensors can be freed
            part.result()


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, made once per size and kept: torch's thread count is per thread,
    so callers may differ, and a pool is cheap while idle."""
    with _pool_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="petald-matmul")
        return _pools[workers]
