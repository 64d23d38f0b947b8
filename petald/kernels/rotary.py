"""Rotary position embeddings: cos/sin tables for the positions a step covers."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from petald.kernels.models.dims import ModelDims
from petald.kernels.models.features import (
    ROPE_TYPES,
    UnsupportedFeature,
    rope_parameters,
    served_positions,
)
from petald.kernels.models.registry import family_of


def _default_inv_freq(config: PretrainedConfig) -> tuple[torch.Tensor, float]:
    base = config.rope_parameters["rope_theta"]
    dim = ModelDims.of(config).head_dim
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


class RotaryTable:
    """Precomputed cos/sin for positions [0, max_positions), in the compute dtype; both None for a family
    without rotary embeddings (ALiBi's BLOOM), which still serves max_positions."""

    cos: torch.Tensor | None
    sin_signed: torch.Tensor | None

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, device: torch.device):
        self.max_positions = served_positions(config)  # longrope: its short regime only
        if family_of(config).alibi:
            self.cos = self.sin_signed = None
            return
        rope = rope_parameters(config)
        rope_type = rope.get("rope_type", "default")
        if rope_type == "default":
            inv_freq, scaling = _default_inv_freq(config)
        elif rope_type in ROPE_TYPES:
            # Static scalings only; "dynamic" depends on the sequence length seen so far.
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device=None)
        else:  # the source refused it already (models/features.py); a config built by hand may get here
            raise UnsupportedFeature(f"rope scaling type {rope_type!r} is not supported")
        positions = torch.arange(self.max_positions, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scaling).to(device=device, dtype=dtype)
        sin = emb.sin() * scaling
        # sin with its first half negated: rotate_half(x) * sin == x.roll(half) * sin_signed, which
        # saves the negation and the concatenation of rotate_half on every block of every step.
        half = sin.shape[-1] // 2
        self.sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(device=device, dtype=dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape [N, heads, head_dim] by tables of shape [N, 1, head_dim] (``RotaryTable``'s
    ``cos`` and ``sin_signed``): x * cos + rotate_half(x) * sin, as the reference models compute it."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)
