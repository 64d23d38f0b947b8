"""One Llama-family transformer block in plain tensors (Llama, Mistral, Qwen2).

Q/K/V and gate/up projections are fused into single matmuls: fewer, larger
kernels are what a 2-core CPU and a GPU both prefer. Each linear layer is a
callable from ``kernels/quant.py`` (dense, int8, int4 or bitsandbytes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from petald.kernels.adapters.lora import BlockLora
from petald.kernels.models.dims import ModelDims
from petald.kernels.models.registry import family_of
from petald.kernels.native.decode_attention import decode_attention, native_decode_attention_usable
from petald.kernels.quant import Linear, make_linear
from petald.kernels.rotary import apply_rotary
from petald.kernels.step_batch import StepBatch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # the same arithmetic, fewer ops
    # Normalise in fp32 whatever the compute dtype, as the reference models do.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def project(linear: Linear, group: str, h: torch.Tensor, lora: BlockLora | None) -> torch.Tensor:
    """``linear(h)``, plus the adapter's delta for that fused projection where it has one."""
    y = linear(h)
    delta = None if lora is None else lora.delta(group, h)
    return y if delta is None else y + delta


class TransformerBlock:
    def __init__(self, weights: dict[str, torch.Tensor], config: PretrainedConfig, index: int,
                 dtype: torch.dtype, device: torch.device, quant: str = "none"):
        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype).contiguous()

        def linear(names: list[str]) -> Linear:
            weight = torch.cat([weights[f"{n}.weight"] for n in names])
            biases = [weights.get(f"{n}.bias") for n in names]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat([b if b is not None else torch.zeros(weights[f"{n}.weight"].shape[0])
                                  for b, n in zip(biases, names, strict=True)])
            return make_linear(weight, bias, quant, dtype, device)

        dims = ModelDims.of(config)
        self.index = index
        self.n_heads, self.n_kv_heads, self.head_dim = dims.heads, dims.kv_heads, dims.head_dim
        self.eps = config.rms_norm_eps
        self.window = family_of(config).sliding_window(config, index)

        self.ln_attn = w("input_layernorm.weight")
        self.ln_mlp = w("post_attention_layernorm.weight")
        self.qkv = linear([f"self_attn.{p}_proj" for p in "qkv"])
        self.o = linear(["self_attn.o_proj"])
        self.gate_up = linear(["mlp.gate_proj", "mlp.up_proj"])
        self.down = linear(["mlp.down_proj"])
        self.native_decode = native_decode_attention_usable(dtype, device, self.head_dim)

    def forward(self, x: torch.Tensor, batch: StepBatch, k_pool: torch.Tensor, v_pool: torch.Tensor,
                lora: BlockLora | None = None) -> torch.Tensor:
        """Run the flattened tokens ``x`` [N, hidden] of ``batch``; writes their keys and values into the pools.

        With ``lora``, each projection gets that adapter's delta added to its output.
        """
        h = rms_norm(x, self.ln_attn, self.eps)
        qkv = project(self.qkv, "qkv", h, lora)
        if batch.all_decode and self.native_decode:
            attn = decode_attention(qkv, self.n_heads, self.n_kv_heads, batch.cos, batch.sin_signed, k_pool, v_pool,
                                    batch.write_slots, batch.decode_slots, batch.decode_lengths, self.window)
        else:
            attn = self.attention(qkv, batch, k_pool, v_pool)
        x = x + project(self.o, "o", attn, lora)
        h = rms_norm(x, self.ln_mlp, self.eps)
        gate, up = project(self.gate_up, "gate_up", h, lora).chunk(2, dim=-1)
        return x + project(self.down, "down", F.silu(gate) * up, lora)

    def attention(self, qkv: torch.Tensor, batch: StepBatch, k_pool: torch.Tensor,
                  v_pool: torch.Tensor) -> torch.Tensor:
        """Rotary, the cache write and attention in torch ops: [N, heads * head_dim] from ``qkv``.

        ``kernels/decode_attention.py`` does the same for decode steps on CPU in one C call."""
        n = qkv.shape[0]
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        # Queries and keys rotated in one call: half the small ops of rotating each.
        qk = apply_rotary(qkv[:, : q_size + kv_size].view(n, self.n_heads + self.n_kv_heads, self.head_dim),
                          batch.cos, batch.sin_signed)
        q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
        k_pool.index_copy_(0, batch.write_slots, k)
        v_pool.index_copy_(0, batch.write_slots, qkv[:, q_size + kv_size :].view(n, self.n_kv_heads, self.head_dim))
        return self.attend(q, batch, k_pool, v_pool).reshape(n, q_size)

    def attend(self, q: torch.Tensor, batch: StepBatch, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """Attention of each segment's queries [N, heads, head_dim] over that segment's own pages."""
        if batch.all_decode:
            return self.attend_decode(q, batch, k_pool, v_pool)
        out = torch.empty_like(q)
        if batch.decode_rows is not None:
            out[batch.decode_rows] = self.attend_decode(q[batch.decode_rows], batch, k_pool, v_pool)
        for index, p in enumerate(batch.prefills):
            k = k_pool.index_select(0, p.key_slots).transpose(0, 1).unsqueeze(0)  # [1, kv_heads, keys, head_dim]
            v = v_pool.index_select(0, p.key_slots).transpose(0, 1).unsqueeze(0)
            a = F.scaled_dot_product_attention(q[p.first : p.last].transpose(0, 1).unsqueeze(0), k, v,
                                               attn_mask=batch.prefill_mask(index, self.window),
                                               enable_gqa=self.n_heads != self.n_kv_heads)
            out[p.first : p.last] = a[0].transpose(0, 1)
        return out

    def attend_decode(self, q: torch.Tensor, batch: StepBatch, k_pool: torch.Tensor,
                      v_pool: torch.Tensor) -> torch.Tensor:
        """All single-token segments in one call: q [S, heads, head_dim] over keys padded to the longest.

        The query heads that share a key/value head attend as the rows of one query matrix
        ([S, kv_heads, group, head_dim]): the arithmetic of ``enable_gqa``, without its expansion of the
        keys. On CPU, for 16 sessions, float32 is 1.1-1.8x and bfloat16 4.5-7x faster, and one session is
        no slower (benchmarks.md, "bfloat16 on CPU"). Prefill chunks keep ``enable_gqa``: there the
        grouped form measured slower.
        """
        seqs, longest = batch.decode_slots.shape
        slots = batch.decode_slots.view(-1)
        k = k_pool.index_select(0, slots).view(seqs, longest, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v_pool.index_select(0, slots).view(seqs, longest, self.n_kv_heads, self.head_dim).transpose(1, 2)
        group = self.n_heads // self.n_kv_heads
        a = F.scaled_dot_product_attention(q.view(seqs, self.n_kv_heads, group, self.head_dim), k, v,
                                           attn_mask=batch.decode_mask(self.window))
        return a.reshape(seqs, self.n_heads, self.head_dim)
