"""How many blocks fit in a memory budget, from the model's config alone (nothing loaded)."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig


def _dims(config: PretrainedConfig) -> tuple[int, int, int, int]:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return hidden, heads * head_dim, kv_heads * head_dim, config.intermediate_size


# Bytes per weight of a quantized linear layer, scales included: int8 has one scale per
# output row; int4 and nf4 pack two weights a byte plus a scale (and a minimum) per 32-64.
_QUANT_BYTES_PER_WEIGHT = {"int8": 1.0, "int4": 0.625, "nf4": 0.56}


def weight_bytes_per_block(config: PretrainedConfig, dtype: torch.dtype, quant: str = "none") -> int:
    hidden, q, kv, inter = _dims(config)
    linear = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter  # qkv, o, gate/up/down
    small = (q + 2 * kv) + 2 * hidden  # a qkv bias if any, two norms: kept in the compute dtype
    dtype_bytes = torch.finfo(dtype).bits / 8
    per_weight = _QUANT_BYTES_PER_WEIGHT.get(quant, dtype_bytes)
    return int(linear * per_weight + small * dtype_bytes)


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Keys and values of one token in one block."""
    _, _, kv, _ = _dims(config)
    return 2 * kv * torch.finfo(dtype).bits // 8


def available_memory(device: torch.device) -> int:
    """Free memory a server may plan with: what the device has free now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise RuntimeError("cannot read the free memory of this machine; pass --num-blocks or --memory-limit")


def blocks_that_fit(config: PretrainedConfig, dtype: torch.dtype, memory_bytes: int, cache_tokens: int,
                    quant: str = "none") -> int:
    """Blocks whose weights fit beside a KV cache of ``cache_tokens`` (tokens summed over blocks)."""
    room = memory_bytes - cache_tokens * kv_bytes_per_token(config, dtype)
    return max(0, min(config.num_hidden_layers, room // weight_bytes_per_block(config, dtype, quant)))
