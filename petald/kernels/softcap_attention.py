"""A block's attention arithmetic: torch's ``scaled_dot_product_attention``, or, for a family whose
scores are soft-capped (Gemma 2: ``cap * tanh(scores / cap)`` before the mask and softmax), the same
steps written out, which no fused kernel offers. ALiBi's bias (BLOOM, ``kernels/alibi.py``) is added to
the scores as a float mask, which torch's kernel takes.

The written-out form follows transformers' eager attention for such models: scores in the compute
dtype, capped, masked, softmax in float32, back to the compute dtype, times the values. It is the
torch fallback a soft-capped family's decode steps take instead of petald's C kernel
(``TransformerBlock.native_decode`` is None for it; benchmarks.md, "Soft-capped attention").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from petald.kernels.alibi import alibi_bias


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float | None, softcap: float | None, is_causal: bool = False,
                    enable_gqa: bool = False, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``q`` [..., heads, T, d] over ``k``, ``v`` [..., kv_heads, S, d] (as torch's
    ``scaled_dot_product_attention`` takes them): ``mask`` (True = attend) or ``is_causal``, scores
    scaled by ``scale`` (None: d ** -0.5), soft-capped at ``softcap`` (None: not capped) and biased by
    ALiBi's ``alibi`` slopes (shaped [heads, T or 1, 1] as the scores' heads and queries, or None) times
    each key's position 0..S-1."""
    if is_causal and (softcap is not None or alibi is not None):
        t, s = q.shape[-2], k.shape[-2]
        mask, is_causal = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t), False
    if alibi is not None:  # a float mask: the bias, -inf where not attended
        mask = alibi_bias(alibi, k.shape[-2], mask, q.dtype)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask if mask.is_floating_point() else scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
