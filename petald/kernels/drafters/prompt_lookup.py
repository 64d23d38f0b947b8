"""Prompt lookup: drafts copied from the context, no model.

Where the last few tokens appeared before in the context (the prompt and what was generated),
the tokens that followed them then are the draft. Text that repeats its input (editing or
summarising a given text, code, quoting) drafts long runs that the model accepts; open chat
finds few matches, and draws no draft where none is found (the step is a plain decode step).
"""

from __future__ import annotations

import torch


class PromptLookupDrafter:
    """Drafts from the latest earlier occurrence of the context's last ``max_ngram`` tokens, down to
    ``min_ngram`` (longer matches first: they predict better)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram lengths must satisfy 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def draft(self, context: list[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``k`` tokens to follow ``context``, and None: the drafts are deterministic (one-hot q)."""
        if k <= 0:
            return [], None
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            tail = context[-n:]
            # The latest match wins: recent text is the likeliest to repeat. The tail itself is not a match.
            for start in range(len(context) - n - 1, -1, -1):
                if context[start : start + n] == tail:
                    follow = context[start + n : start + n + k]
                    if follow:
                        return follow, None
        return [], None
