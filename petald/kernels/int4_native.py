"""petald's own int4 matmul (``int4_matmul.c``), compiled on first use and called through ctypes.

torch's ``_weight_int4pack_mm_for_cpu`` turns every 4-bit weight into a float before it
multiplies, and runs at about 15 GMAC/s on one core here: SmolLM2's 30 int4 blocks spent
8 ms of a 16.6 ms token in it, while reading their 53 MB of weights takes about 2 ms.
The C kernel turns 32 weights into bfloat16 with one table lookup and multiplies pairs with
AVX512-BF16 (see the C file's header), which is what a CPU with AVX512-BF16 (Zen 4, Sapphire
Rapids and later) can do; benchmarks.md, "petald's own int4 kernel", has the figures.

It is C, not a torch extension: no Python or torch headers, no ninja, one ``cc`` call (under
a second), cached under petald's cache directory by the source's hash. Where there is no C
compiler, the CPU lacks AVX512-BF16, or ``PETALD_NATIVE_INT4=0``, ``Int4Linear`` keeps
torch's kernel: same weights, same arithmetic up to float rounding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

from petald.kernels.cache_dir import petald_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int4_matmul.c")
TILE = 16  # output rows per packed tile (one float32 AVX512 register)
GROUP = 32  # inputs per scale/zero group; kernels/quant.py's INT4_GROUP
RECORD = 320  # bytes per (tile, group): 256 of nibbles, 16 bfloat16 scales, 16 bfloat16 zeros


def native_int4_enabled() -> bool:
    """Whether ``Int4Linear`` should use the C kernel: built, loadable, and this CPU runs it."""
    return os.environ.get("PETALD_NATIVE_INT4", "1") != "0" and _library() is not None


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The kernel's records from ``q`` [N, K] (ints in [0, 16)) and ``scale``, ``zero`` [K / 32, N];
    N a multiple of 16 and K of 32 (``Int4Linear`` refuses other shapes).

    w[n, k] = (q[n, k] - 8) * scale[k // 32, n] + zero[k // 32, n], as in ``Int4Linear``.
    """
    n, k = q.shape
    tiles, groups = n // TILE, k // GROUP
    # k = 32 g + 4 c + 2 h + e: h picks the low (0) or high (1) nibble of a byte.
    q6 = q.to(torch.uint8).reshape(tiles, TILE, groups, 8, 2, 2)
    nibbles = q6[:, :, :, :, 0, :] | (q6[:, :, :, :, 1, :] << 4)  # [t, r, g, c, e]
    nibbles = nibbles.permute(0, 2, 3, 1, 4).reshape(tiles, groups, 256)

    def per_tile(v: torch.Tensor) -> torch.Tensor:  # [G, N] -> [T, G, 32] bytes of bfloat16
        v = v.to(torch.bfloat16).reshape(groups, tiles, TILE).permute(1, 0, 2).contiguous()
        return v.view(torch.uint8).reshape(tiles, groups, 2 * TILE)

    return torch.cat([nibbles, per_tile(scale), per_tile(zero)], dim=-1).contiguous()


def matmul(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x`` [M, K] (any float dtype) times the packed weights' transpose: float32 [M, N]."""
    library = _library()
    x = x.to(torch.bfloat16).contiguous()
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    if x.shape[0] == 0:
        return out
    if library.petald_int4_matmul(x.data_ptr(), x.shape[0], x.shape[1], packed.data_ptr(), out_features,
                                  out.data_ptr()) != 0:
        raise MemoryError("the int4 kernel could not allocate its scratch space")
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (logged once) where it cannot be built or run here."""
    try:
        path = _build()
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        log.info("petald's int4 kernel is not available (%s); int4 layers use torch's kernel", e)
        return None
    library.petald_int4_cpu_supported.restype = ctypes.c_int
    if not library.petald_int4_cpu_supported():
        log.info("this CPU lacks AVX512-BF16; int4 layers use torch's kernel")
        return None
    library.petald_int4_matmul.restype = ctypes.c_int
    library.petald_int4_matmul.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                           ctypes.c_int, ctypes.c_void_p]
    return library


def _build() -> Path:
    """Compile ``int4_matmul.c`` into the cache (once per source), atomically."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) on PATH")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + compiler.encode()).hexdigest()[:16]
    target = petald_cache_dir() / "native" / f"int4_matmul-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    result = subprocess.run([compiler, "-O3", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
    tmp.replace(target)
    return target
