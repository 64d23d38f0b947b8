"""Choosing a device and a compute dtype from what the user asked for."""

from __future__ import annotations

import logging

import torch

from petald.kernels.quant import native_bfloat16_matmul
from petald.vocabulary import DTYPE_NAMES

log = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}: use cpu, cuda or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # float32 on CPU: the arithmetic of the reference models, and the fastest unless the CPU has native
        # bfloat16 dot products (then --dtype bfloat16 is ~1.4x faster: benchmarks.md); GPUs halve memory for free.
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES)}")
    if name == "bfloat16" and device.type == "cpu" and not native_bfloat16_matmul():
        log.warning("--dtype bfloat16: this CPU has no native bfloat16 matmul (AVX512-BF16 or AMX), where "
                    "bfloat16 blocks run slower than float32 ones: using float32")
        return torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
