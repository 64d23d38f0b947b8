"""Choosing the next token from logits (greedy, temperature and nucleus top-p), and when to stop."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def end_of_sequence_ids(*values: int | Iterable[int] | None) -> list[int]:
    """Every end-of-sequence id among ``values``, sorted, once each. Each value is one id, a list
    of ids (Llama 3 configs carry several) or None (none given), as configs and tokenizers hold them."""
    found: set[int] = set()
    for value in values:
        if value is None:
            continue
        found.update([int(value)] if isinstance(value, int) else (int(v) for v in value))
    return sorted(found)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, vocab]. temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(target_probs(logits, temperature, top_p), 1, generator=generator).squeeze(-1)


def target_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The distribution sampling draws from (temperature > 0): softmax of ``logits`` [..., vocab] /
    temperature, cut to the smallest prefix of most likely tokens reaching ``top_p`` (not renormalized:
    ``torch.multinomial`` does not need it, and speculative sampling normalizes where it must)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs[before >= top_p] = 0.0  # keep the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs
