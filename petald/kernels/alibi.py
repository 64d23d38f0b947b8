"""ALiBi (BLOOM): instead of rotating queries and keys, each head adds ``slope * key_position`` to its
attention scores, its slope one of a geometric series over the heads.

The bias grows with the key's absolute position, not its distance to the query: softmax does not change
when a row's scores all shift by one amount, so the two are the same attention (transformers' BLOOM adds
it so too). petald's paged attention adds it where the scores are formed (``softcap_attention.py``); the C
decode attention, which has no bias, is not used for such blocks (``TransformerBlock.native_decode``).
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(heads: int) -> torch.Tensor:
    """The float32 slopes [heads] of ALiBi's series (BLOOM's, for any number of heads): for the largest
    power of two n <= heads, 2 ** (-8 i / n) for i = 1..n, then the odd terms of the series for 2n heads."""
    power = 2 ** math.floor(math.log2(heads))
    slopes = torch.pow(torch.tensor(2 ** (-8 / power), dtype=torch.float32), torch.arange(1, 1 + power))
    if power != heads:
        extra = torch.pow(torch.tensor(2 ** (-4 / power), dtype=torch.float32),
                          torch.arange(1, 1 + 2 * min(power, heads - power), 2))
        slopes = torch.cat([slopes, extra])
    return slopes


def alibi_bias(slopes: torch.Tensor, keys: int, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The additive score bias for ``keys`` keys at positions 0..keys-1: ``slopes`` (shaped to broadcast
    against the scores' [..., heads, queries] dimensions, with a trailing 1) times the key positions, in
    ``dtype``, with -inf where the boolean ``mask`` (True = attend) says not to attend."""
    bias = (slopes * torch.arange(keys, device=slopes.device, dtype=torch.float32)).to(dtype)
    return bias if mask is None else bias.masked_fill(~mask, float("-inf"))
