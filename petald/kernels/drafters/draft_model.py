"""A draft model: a small local model that shares the big one's tokenizer guesses the next tokens.

It runs in the client's process on petald's own kernels (all its blocks in one ``BlockSpan``,
its head in a ``ClientHead``), greedily: its drafts are deterministic, so the acceptance rule
treats them as one-hot (``speculative_sampling.py``) and the output stays exact, sampled or not.
It keeps its own KV cache of the context between drafts: each call runs only the tokens the
context gained since the last one, after rolling its cache back to where the two still agree
(the big model refused some of its drafts, or a new generation began).
"""

from __future__ import annotations

import torch

from petald.kernels.client_head import ClientHead
from petald.kernels.paged_kv_cache import SessionCache
from petald.kernels.sources.model_source import ModelSource
from petald.kernels.span import BlockSpan

CACHE_TOKENS = 4096  # the longest context it drafts from; longer ones start over from their last part


class DraftModelDrafter:
    def __init__(self, source: ModelSource, vocab_size: int, device: torch.device | str = "cpu"):
        """``vocab_size``: the big model's; a draft model with another vocabulary is refused."""
        drafts = source.config.vocab_size
        if drafts != vocab_size:
            raise ValueError(f"the draft model {source.identity.model_id} has a vocabulary of {drafts} tokens, "
                             f"the model {vocab_size}: a draft model must share the model's tokenizer")
        device = torch.device(device)
        self.span = BlockSpan(source, 0, source.config.num_hidden_layers, torch.float32, device)
        self.head = ClientHead(source, torch.float32, device)
        self.length = min(CACHE_TOKENS, self.span.max_positions)
        self.cache: SessionCache = self.span.new_cache(1, self.length)
        self.held: list[int] = []  # the tokens whose keys and values the cache holds, in order

    @torch.inference_mode()
    def draft(self, context: list[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``k`` greedy tokens of the draft model after ``context``, and None (deterministic)."""
        if k <= 0 or not context:
            return [], None
        k = min(k, self.length - 1)
        context = context[-(self.length - k):]  # room for the drafts
        agree = next((i for i, (a, b) in enumerate(zip(self.held, context, strict=False)) if a != b),
                     min(len(self.held), len(context)))
        agree = min(agree, len(context) - 1)  # the last token runs again: its logits are the first draft's
        self.cache.pool.truncate(self.cache, agree)
        self.held = context[:agree]
        drafts: list[int] = []
        step = context[agree:]
        while len(drafts) < k:
            hidden = self.span.forward(self.head.embed(torch.tensor([step])), self.cache)
            self.held += step
            drafts.append(int(self.head.logits(hidden[:, -1]).argmax(-1)[0]))
            step = drafts[-1:]
        return drafts, None
