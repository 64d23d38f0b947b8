"""One Llama-shaped transformer block in plain tensors, with its family's departures
(``kernels/models/``: q/k norms, extra norms, soft-capped scores, a mixture of experts, LayerNorms, an
ungated MLP, a parallel residual, ALiBi, ...).

Q/K/V and gate/up projections are fused into single matmuls: fewer, larger
kernels are what a 2-core CPU and a GPU both prefer. Each linear layer is a
callable from ``kernels/quant.py`` (dense, int8, int4 or bitsandbytes).

The block's forward is written once, for a server's steps and for training alike:
only attention differs between them, and the caller hands it in (``Attention``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import PretrainedConfig

from petald.kernels.adapters.lora import BlockLora
from petald.kernels.alibi import alibi_slopes
from petald.kernels.models.dims import ModelDims
from petald.kernels.models.features import ACTIVATIONS, activation_name
from petald.kernels.models.registry import family_of
from petald.kernels.moe import MixtureOfExperts
from petald.kernels.native.decode_attention import decode_attention_kernel
from petald.kernels.norms import Norm, load_norm
from petald.kernels.quant import Linear, make_linear


def project(linear: Linear, group: str, h: torch.Tensor, lora: BlockLora | None) -> torch.Tensor:
    """``linear(h)``, plus the adapter's delta for that fused projection where it has one."""
    y = linear(h)
    delta = None if lora is None else lora.delta(group, h)
    return y if delta is None else y + delta


class Attention(Protocol):
    """How a block's queries meet the keys: rotary, keys and values kept where the caller keeps
    them, and attention. A server's batched steps over its paged KV cache are
    ``kernels/step_batch.StepBatch``; training over whole sequences is
    ``kernels/training_forward.WholeSequences``."""

    def attend(self, block: TransformerBlock, qkv: torch.Tensor, k_pool: torch.Tensor | None,
               v_pool: torch.Tensor | None) -> torch.Tensor:
        """The attention output [..., heads * head_dim] for the fused projection ``qkv``
        [..., q + 2 kv]."""
        ...


class TransformerBlock:
    def __init__(self, weights: dict[str, torch.Tensor], config: PretrainedConfig, index: int,
                 dtype: torch.dtype, device: torch.device, quant: str = "none"):
        def linear(names: list[str], rows: torch.Tensor | None = None) -> Linear:
            weight = torch.cat([weights[f"{n}.weight"] for n in names])
            biases = [weights.get(f"{n}.bias") for n in names]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat([b if b is not None else torch.zeros(weights[f"{n}.weight"].shape[0])
                                  for b, n in zip(biases, names, strict=True)])
            if rows is not None:  # a fused projection stored in another row order than petald's
                weight, bias = weight[rows], None if bias is None else bias[rows]
            return make_linear(weight, bias, quant, dtype, device)

        dims = ModelDims.of(config)
        family = family_of(config)
        self.index = index
        self.n_heads, self.n_kv_heads, self.head_dim = dims.heads, dims.kv_heads, dims.head_dim
        self.q_size, self.kv_size = dims.q_size, dims.kv_size
        self.eps = getattr(config, family.norm_eps_key)
        self.window = family.sliding_window(config, index)
        self.activation = ACTIVATIONS[activation_name(config)]
        loaded: dict[str, Norm] = {}

        def norm(name: str | None, layer_norm: bool = family.layer_norm) -> Norm | None:
            if name is not None and name not in loaded:  # a norm named twice (Falcon's shared one) is one
                loaded[name] = load_norm(weights, name, layer_norm, family.norm_weight_offset, self.eps, dtype, device)
            return None if name is None else loaded[name]

        self.q_norm = norm("self_attn.q_norm", False) if family.qk_norm else None
        self.k_norm = norm("self_attn.k_norm", False) if family.qk_norm else None
        # Before attention, after it, before the MLP, after it (None where the family has no such norm).
        self.ln_attn, self.ln_attn_out, self.ln_mlp, self.ln_mlp_out = (norm(n) for n in family.norms(config))
        self.parallel = family.parallel_residual(config)  # attention and MLP both read x (Falcon)
        # Attention's score scale (None: head_dim ** -0.5) and soft-cap (None: none).
        self.scale, self.softcap = family.attention_scale(config), family.attention_softcap(config)
        # ALiBi's slopes, one per head (float32 [heads]), where the family biases scores by key position (BLOOM).
        self.alibi = alibi_slopes(self.n_heads).to(device) if family.alibi else None
        self.qkv = linear(list(family.qkv_projections), family.qkv_row_order(config))
        self.o = linear([family.o_projection])
        # A dense MLP (gate_up, down; gate_up is up alone where the MLP is not gated), or a mixture of experts
        # (moe) where the family has one.
        self.gated = family.gated_mlp
        self.gate_up = linear(list(family.gate_up_projections)) if family.experts is None else None
        self.down = linear([family.down_projection]) if family.experts is None else None
        self.moe = None if family.experts is None else MixtureOfExperts(
            weights, family.experts, config, linear,
            weights[f"{family.experts.router}.weight"].to(device=device, dtype=dtype).contiguous())
        # The variant of petald's C kernel a StepBatch of decode steps runs this block's attention in, if any:
        # it computes plain softmax attention at head_dim ** -0.5, with rotary, only.
        plain = self.scale is None and self.softcap is None and self.alibi is None
        self.native_decode = decode_attention_kernel(dtype, device, self.head_dim) if plain else None

    def forward(self, x: torch.Tensor, attention: Attention, k_pool: torch.Tensor | None = None,
                v_pool: torch.Tensor | None = None, lora: BlockLora | None = None) -> torch.Tensor:
        """The block over ``x`` [..., hidden]: a server's flattened tokens [N, hidden] with this
        block's KV pools, or training's whole sequences [B, T, hidden] without.

        With ``lora``, each projection gets that adapter's delta added to its output.
        """
        h = self.ln_attn(x)
        qkv = self._norm_heads(project(self.qkv, "qkv", h, lora))
        attended = self._norm_out(project(self.o, "o", attention.attend(self, qkv, k_pool, v_pool), lora),
                                  self.ln_attn_out)
        if self.parallel:  # Falcon: the MLP reads the block's input too, and both outputs are summed first
            return x + (self._mlp(h if self.ln_mlp is self.ln_attn else self.ln_mlp(x), lora) + attended)
        x = x + attended
        return x + self._mlp(self.ln_mlp(x), lora)

    def _mlp(self, h: torch.Tensor, lora: BlockLora | None) -> torch.Tensor:
        if self.moe is not None:
            return self._norm_out(self.moe.forward(h, self.activation), self.ln_mlp_out)
        up = project(self.gate_up, "gate_up", h, lora)
        if self.gated:
            gate, up = up.chunk(2, dim=-1)
            up = self.activation(gate) * up
        else:
            up = self.activation(up)
        return self._norm_out(project(self.down, "down", up, lora), self.ln_mlp_out)

    def _norm_out(self, y: torch.Tensor, norm: Norm | None) -> torch.Tensor:
        """An attention's or MLP's output ``y``, normed where the family norms it before the residual add."""
        return y if norm is None else norm(y)

    def _norm_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """``qkv`` with each query and key head RMS-normed, where the family norms them (Qwen3)."""
        if self.q_norm is None:
            return qkv
        lead = qkv.shape[:-1]
        q_and_k = self.q_size + self.kv_size
        q = self.q_norm(qkv[..., : self.q_size].reshape(*lead, self.n_heads, self.head_dim))
        k = self.k_norm(qkv[..., self.q_size : q_and_k].reshape(*lead, self.n_kv_heads, self.head_dim))
        return torch.cat([q.reshape(*lead, self.q_size), k.reshape(*lead, self.kv_size), qkv[..., q_and_k:]], dim=-1)
