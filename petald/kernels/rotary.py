"""Rotary position embeddings: cos/sin tables for the positions a step covers."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def _default_inv_freq(config: PretrainedConfig) -> tuple[torch.Tensor, float]:
    base = config.rope_parameters["rope_theta"]
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


class RotaryTable:
    """Precomputed cos/sin for positions [0, max_positions), in the compute dtype."""

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, device: torch.device):
        rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        if rope_type == "default":
            inv_freq, scaling = _default_inv_freq(config)
        elif rope_type in ("linear", "llama3", "yarn", "longrope"):
            # Static scalings only; "dynamic" depends on the sequence length seen so far.
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device=None)
        else:
            raise ValueError(f"rope type {rope_type!r} is not supported")
        self.max_positions = int(config.max_position_embeddings)
        positions = torch.arange(self.max_positions, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scaling).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * scaling).to(device=device, dtype=dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape [N, heads, head_dim] by tables of shape [N, 1, head_dim]."""
    return x * cos + _rotate_half(x) * sin
