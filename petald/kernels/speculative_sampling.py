"""Which drafted tokens the model keeps: the speculative sampling acceptance rule.

A verify step ran the last chosen token and n drafted tokens through the model in one step, so
``logits[i]`` is the model's prediction after draft i (``logits[0]``: after the last chosen
token). The rule keeps the longest prefix of the drafts the model accepts and adds one token of
the model's own, so that every token follows the model's distribution exactly, as if sampled one
at a time (Leviathan et al. 2023, Chen et al. 2023):

- greedy (temperature 0): a draft is kept while it is the argmax; the added token is the argmax
  after the last kept one. The tokens are plain greedy decoding's, token for token.
- sampled: draft d, drawn from the drafter's distribution q, is kept with probability
  min(1, p(d) / q(d)), p being the model's (temperature and top-p applied); at the first one
  refused, the added token is drawn from max(0, p - q), normalized; when all are kept, from p
  after the last. A drafter that draws no distribution (prompt lookup, a greedy draft model)
  is deterministic: q is one-hot, so d is kept with probability p(d) and a refusal draws from p
  with d taken out.
"""

from __future__ import annotations

import torch

from petald.kernels.sampling import target_probs


def accept_drafts(logits: torch.Tensor, drafts: list[int], temperature: float = 0.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None,
                  draft_probs: torch.Tensor | None = None) -> tuple[int, int]:
    """(how many of ``drafts`` are kept, the token added after them).

    ``logits`` [len(drafts) + 1, vocab]; ``draft_probs`` [len(drafts), vocab]: the distribution each
    draft was drawn from (None: deterministic drafts, one-hot)."""
    if logits.dim() != 2 or logits.shape[0] != len(drafts) + 1:
        raise ValueError(f"logits have shape {list(logits.shape)}; expected [{len(drafts) + 1}, vocab]")
    if temperature <= 0:
        best = logits.argmax(dim=-1).tolist()
        kept = next((i for i, d in enumerate(drafts) if best[i] != d), len(drafts))
        return kept, best[kept]
    p = target_probs(logits, temperature, top_p)
    p = p / p.sum(dim=-1, keepdim=True)
    for i, d in enumerate(drafts):
        q = draft_probs[i] if draft_probs is not None else None
        q_d = float(q[d]) if q is not None else 1.0
        keep = 1.0 if q_d <= 0 else min(1.0, float(p[i, d]) / q_d)  # q_d 0: never drawn; keep it as p says
        if float(torch.rand((), generator=generator)) < keep:
            continue
        if q is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - q.to(p.dtype)).clamp_min(0.0)
        if float(residual.sum()) <= 0:  # p == q (within rounding): refusal was (almost) impossible
            residual = p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))
