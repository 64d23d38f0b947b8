"""One Llama-family transformer block in plain tensors (Llama, Mistral, Qwen2).

Q/K/V and gate/up projections are fused into single matmuls: fewer, larger
kernels are what a 2-core CPU and a GPU both prefer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from petald.kernels.rotary import apply_rotary


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 whatever the compute dtype, as the reference models do.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def sliding_window_of(config: PretrainedConfig, index: int) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        return window if layer_types[index] == "sliding_attention" else None
    return window if config.model_type == "mistral" else None


class TransformerBlock:
    def __init__(self, weights: dict[str, torch.Tensor], config: PretrainedConfig, index: int,
                 dtype: torch.dtype, device: torch.device):
        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype).contiguous()

        def maybe(name: str) -> torch.Tensor | None:
            return w(name) if name in weights else None

        self.index = index
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.eps = config.rms_norm_eps
        self.window = sliding_window_of(config, index)

        self.ln_attn = w("input_layernorm.weight")
        self.ln_mlp = w("post_attention_layernorm.weight")
        self.w_qkv = torch.cat([w(f"self_attn.{p}_proj.weight") for p in "qkv"]).contiguous()
        biases = [maybe(f"self_attn.{p}_proj.bias") for p in "qkv"]
        if any(b is not None for b in biases):
            sizes = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim)
            biases = [b if b is not None else torch.zeros(n, dtype=dtype, device=device) for b, n in zip(biases, sizes, strict=True)]
            self.b_qkv: torch.Tensor | None = torch.cat(biases)
        else:
            self.b_qkv = None
        self.w_o = w("self_attn.o_proj.weight")
        self.b_o = maybe("self_attn.o_proj.bias")
        self.w_gate_up = torch.cat([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")]).contiguous()
        self.w_down = w("mlp.down_proj.weight")

    def attention_mask(self, start: int, length: int, device: torch.device) -> torch.Tensor | None:
        """Boolean [length, start+length] mask (True = attend), or None when causality is free."""
        if length == 1 and (self.window is None or start < self.window):
            return None
        q_pos = torch.arange(start, start + length, device=device)[:, None]
        k_pos = torch.arange(start + length, device=device)[None, :]
        mask = k_pos <= q_pos
        if self.window is not None:
            mask &= k_pos > q_pos - self.window
        return mask

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        """Run positions [start, start+T) of ``x`` [B, T, hidden]; fills the caches in place."""
        batch, length, _ = x.shape
        h = rms_norm(x, self.ln_attn, self.eps)
        qkv = F.linear(h, self.w_qkv, self.b_qkv)
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        end = start + length
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v
        attn = F.scaled_dot_product_attention(
            q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask,
            enable_gqa=self.n_heads != self.n_kv_heads,
        )
        x = x + F.linear(attn.transpose(1, 2).reshape(batch, length, q_size), self.w_o, self.b_o)
        h = rms_norm(x, self.ln_mlp, self.eps)
        gate, up = F.linear(h, self.w_gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.w_down)
