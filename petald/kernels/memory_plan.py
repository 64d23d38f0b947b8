"""How many blocks fit in a memory budget, from the model's config alone (nothing loaded)."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from petald.kernels.models.dims import ModelDims
from petald.kernels.models.registry import family_of

# Bytes per weight of a quantized linear layer, scales included: int8 has one scale per
# output row; int4 and nf4 pack two weights a byte plus a scale (and a minimum) per 32-64.
_QUANT_BYTES_PER_WEIGHT = {"int8": 1.0, "int4": 0.625, "nf4": 0.56}


def weight_bytes_per_block(config: PretrainedConfig, dtype: torch.dtype, quant: str = "none") -> int:
    dims = ModelDims.of(config)
    hidden, q, kv = dims.hidden, dims.q_size, dims.kv_size
    family = family_of(config)
    # qkv, o, gate/up/down (each expert's, for a mixture of experts: all of a block's live on its server)
    experts = 1 if family.experts is None else int(getattr(config, family.experts.count_key))
    mlp_in = 2 if family.gated_mlp else 1  # gate and up, or up alone
    linear = hidden * (q + 2 * kv) + q * hidden + experts * (mlp_in + 1) * hidden * dims.intermediate
    # The qkv bias where the family has one (and the other projections' where it has them), its norms (one
    # to four, a LayerNorm's with its bias), the q/k norms and the experts' router where it has them: kept
    # in the compute dtype.
    norms = len({name for name in family.norms(config) if name is not None}) * (2 if family.layer_norm else 1)
    small = (q + 2 * kv if family.qkv_bias(config) else 0) + norms * hidden + (2 * dims.head_dim if family.qk_norm else 0)
    if family.linear_bias(config):
        small += hidden + mlp_in * dims.intermediate + hidden
    if family.experts is not None:
        small += experts * hidden
    dtype_bytes = torch.finfo(dtype).bits / 8
    per_weight = _QUANT_BYTES_PER_WEIGHT.get(quant, dtype_bytes)
    return int(linear * per_weight + small * dtype_bytes)


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Keys and values of one token in one block."""
    return 2 * ModelDims.of(config).kv_size * torch.finfo(dtype).bits // 8


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
