"""petald's own int8 matmul (``int8_matmul.c``: AVX512F and AVX2 + FMA variants), called through ctypes.

torch's ``_weight_int8pack_mm`` multiplies bfloat16 activations by int8 weights (its float32 path is a
scalar loop, 10-100x slower); this kernel keeps the activations in float32 and turns each weight
into a float exactly, so the product is the dequantized weights' up to float32 accumulation, and it
reads each weight once per 4 rows. Built and loaded with petald's other C kernels
(``native_library.py``, which also chooses the variant); which of it and torch's serves is decided
in ``kernels/quant.py`` (``native_enabled``).
"""

from __future__ import annotations

import torch

from petald.kernels.native.native_library import (
    PROCESS_LIBRARY,
    ChosenKernel,
    NativeKernelError,
    NativeLibrary,
    Variant,
)
from petald.kernels.native.tile_threads import run_over_tiles

VARIANTS = (Variant("avx512", "petald_int8_matmul_avx512", frozenset({"avx512f"})),
            Variant("avx2", "petald_int8_matmul_avx2", frozenset({"avx2", "fma"})))
TILE = 16  # output rows per packed tile
SCALE_BYTES = 4 * TILE  # a tile's float32 scales, after its weights


def int8_kernel(library: NativeLibrary = PROCESS_LIBRARY) -> ChosenKernel | None:
    """The variant this CPU runs (or ``PETALD_CPU_KERNELS`` names), in ``library``; None where none does."""
    return library.choose("int8", VARIANTS)


def pack(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The tiles [N / 16, 16 K + 64] (bytes) from ``q`` int8 [N, K] and ``scale`` [N]: each tile's weights
    input by input (16 output rows a step), then its 16 float32 scales. N must be a multiple of 16."""
    n, k = q.shape
    tiles = n // TILE
    steps = q.reshape(tiles, TILE, k).transpose(1, 2).contiguous().view(torch.uint8).reshape(tiles, TILE * k)
    scales = scale.float().reshape(tiles, TILE).contiguous().view(torch.uint8)
    return torch.cat([steps, scales], dim=1).contiguous()


def matmul(x: torch.Tensor, packed: torch.Tensor, kernel: ChosenKernel) -> torch.Tensor:
    """``x`` [M, K] (any float dtype; multiplied in float32) times the packed weights' transpose:
    float32 [M, N], by ``kernel`` (``int8_kernel``'s)."""
    tiles = packed.shape[0]
    width = (packed.shape[1] - SCALE_BYTES) // TILE
    if x.dim() != 2 or x.shape[1] != width or x.device.type != "cpu":
        raise NativeKernelError(f"the int8 kernel multiplies CPU rows of width {width}; got {list(x.shape)} on {x.device}")
    x = x.float().contiguous()
    rows = x.shape[0]
    out = torch.empty(rows, tiles * TILE, dtype=torch.float32)
    if rows == 0:
        return out

    def run(begin: int, end: int) -> None:
        kernel.function(x.data_ptr(), rows, width, packed.data_ptr(), tiles * TILE, begin, end, out.data_ptr())

    run_over_tiles(run, tiles, rows)
    return out
