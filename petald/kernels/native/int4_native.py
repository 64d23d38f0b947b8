"""petald's own int4 matmul (``int4_matmul.c``), compiled on first use and called through ctypes.

torch's ``_weight_int4pack_mm_for_cpu`` turns every 4-bit weight into a float before it
multiplies, and runs at about 15 GMAC/s on one core here: SmolLM2's 30 int4 blocks spent
8 ms of a 16.6 ms token in it, while reading their 53 MB of weights takes about 2 ms.
The C kernel comes in two variants (``VARIANTS``): on a CPU with AVX512-BF16 (Zen 4, Sapphire
Rapids and later) it turns 32 weights into bfloat16 with one table lookup and multiplies pairs
with vdpbf16ps (``int4_matmul.c``); on one with AVX2 and FMA only it turns 8 weights into floats
with a mask and a conversion and multiplies them with FMA (``int4_matmul_avx2.c``). Both hold the
same records, with the nibbles in their own order (``pack``). benchmarks.md, "petald's own int4
kernel", has the figures.

It is built and loaded with petald's other C kernels (``kernels/native/native_library.py``,
which also chooses the variant). Where there is no C compiler or the CPU has neither,
``Int4Linear`` keeps torch's kernel: same weights, same arithmetic up to float rounding. Which of
the two serves where both can is decided in ``kernels/quant.py`` (``native_int4_enabled``).

A product of many rows is split by output tiles over torch's thread count (``tile_threads``).
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

VARIANTS = (Variant("avx512", "petald_int4_matmul_avx512", frozenset({"avx512f", "avx512bw", "avx512bf16"})),
            Variant("avx2", "petald_int4_matmul_avx2", frozenset({"avx2", "fma"})))
TILE = 16  # output rows per packed tile (one float32 AVX512 register, two AVX2 ones)
GROUP = 32  # inputs per scale/zero group; kernels/quant.py's INT4_GROUP
RECORD = 320  # bytes per (tile, group): 256 of nibbles, 16 bfloat16 scales, 16 bfloat16 zeros


def int4_kernel(library: NativeLibrary = PROCESS_LIBRARY) -> ChosenKernel | None:
    """The variant of the C kernel this CPU runs (or ``PETALD_CPU_KERNELS`` names), in ``library`` (the
    process's own unless told); None where none is built or runs here."""
    return library.choose("int4", VARIANTS)


def native_int4_available(library: NativeLibrary = PROCESS_LIBRARY) -> bool:
    """Whether a variant of the C kernel is built, loaded and runs on this CPU, in ``library``."""
    return int4_kernel(library) is not None


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, isa: str) -> torch.Tensor:
    """The records [N / 16, K / 32, 320] of the ``isa`` variant from ``q`` [N, K] (ints in [0, 16)) and ``scale``,
    ``zero`` [K / 32, N]; N a multiple of 16 and K of 32 (``Int4Linear`` refuses other shapes).

    w[n, k] = (q[n, k] - 8) * scale[k // 32, n] + zero[k // 32, n], as in ``Int4Linear``.
    """
    n, k = q.shape
    tiles, groups = n // TILE, k // GROUP
    if isa == "avx512":
        # k = 32 g + 4 c + 2 h + e: h picks the low (0) or high (1) nibble of a byte; byte 2 r + e of chunk c.
        q6 = q.to(torch.uint8).reshape(tiles, TILE, groups, 8, 2, 2)
        nibbles = q6[:, :, :, :, 0, :] | (q6[:, :, :, :, 1, :] << 4)  # [t, r, g, c, e]
        nibbles = nibbles.permute(0, 2, 3, 1, 4).reshape(tiles, groups, 256)
    else:
        # Row 8 h + r, k = 32 g + 8 b + 2 i + e: byte i of dword r of block (h, b), e the low or high nibble.
        q7 = q.to(torch.uint8).reshape(tiles, 2, 8, groups, 4, 4, 2)
        nibbles = q7[..., 0] | (q7[..., 1] << 4)  # [t, h, r, g, b, i]
        nibbles = nibbles.permute(0, 3, 1, 4, 2, 5).reshape(tiles, groups, 256)

    def per_tile(v: torch.Tensor) -> torch.Tensor:  # [G, N] -> [T, G, 32] bytes of bfloat16
        v = v.to(torch.bfloat16).reshape(groups, tiles, TILE).permute(1, 0, 2).contiguous()
        return v.view(torch.uint8).reshape(tiles, groups, 2 * TILE)

    return torch.cat([nibbles, per_tile(scale), per_tile(zero)], dim=-1).contiguous()


def matmul(x: torch.Tensor, packed: torch.Tensor, kernel: ChosenKernel) -> torch.Tensor:
    """``x`` [M, K] (any float dtype, rounded to bfloat16) times the packed weights' transpose: float32 [M, N],
    by ``kernel`` (``int4_kernel``'s; ``packed`` by ``pack`` for its variant)."""
    tiles, groups = packed.shape[0], packed.shape[1]
    if x.dim() != 2 or x.shape[1] != groups * GROUP or x.device.type != "cpu" or packed.shape[2] != RECORD:
        raise NativeKernelError(f"the int4 kernel multiplies CPU rows of width {groups * GROUP}; "
                                f"got {list(x.shape)} on {x.device}")
    x_is_float32 = x.dtype == torch.float32  # the kernel rounds these itself
    x = x.contiguous() if x_is_float32 else x.to(torch.bfloat16).contiguous()
    rows = x.shape[0]
    out = torch.empty(rows, tiles * TILE, dtype=torch.float32)
    if rows == 0:
        return out

    def run(begin: int, end: int) -> None:
        if kernel.function(x.data_ptr(), int(x_is_float32), rows, x.shape[1], packed.data_ptr(),
                                      tiles * TILE, begin, end, out.data_ptr()) != 0:
            raise MemoryError("the int4 kernel could not allocate its scratch space")

    run_over_tiles(run, tiles, rows)
    return out
