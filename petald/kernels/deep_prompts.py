"""Deep prompts (deep prompt tuning, P-tuning v2 as Petals runs it): the one rule for their shape.

Deep prompts are vectors added to the first P positions of the hidden states before each block.
For ``blocks`` blocks and a batch of ``batch`` rows they are a tensor
[blocks, 1 or batch, P, hidden] (1 shares them across rows), with 1 <= P. The client checks
them before it sends (a wrong shape would otherwise look like every server failing), the server
on what it receives, and the kernels before they add them.
"""

from __future__ import annotations

import torch


def check_deep_prompts(prompts: torch.Tensor, blocks: int, batch: int, hidden_size: int, max_tokens: int,
                       name: str = "prompts") -> None:
    """Raise ValueError naming the expected shape when ``prompts`` does not fit blocks x batch,
    with at most ``max_tokens`` prompt positions."""
    if (prompts.dim() != 4 or prompts.shape[0] != blocks or prompts.shape[1] not in (1, batch)
            or not 1 <= prompts.shape[2] <= max_tokens or prompts.shape[3] != hidden_size):
        raise ValueError(f"{name} have shape {list(prompts.shape)}; expected [{blocks}, 1 or {batch}, "
                         f"1 to {max_tokens} tokens, {hidden_size}]")
