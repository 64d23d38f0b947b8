"""What a client checks of a request before it asks any server: block ranges, hidden states and
lengths. A request no server could ever take fails here at once, with what to change, instead of
looking like failing servers (and waiting out the recovery timeout)."""

from __future__ import annotations

from typing import Any

import torch

from petald.kernels.sources.model_source import ModelIdentity
from petald.p2pnode.client.draft_length import MAX_SPECULATE


def context_length(config: Any) -> int:
    """The most tokens a session may hold: the model's own positions (``max_position_embeddings``)."""
    return int(getattr(config, "max_position_embeddings", 0) or 1 << 62)


def check_blocks(identity: ModelIdentity, start: Any, end: Any) -> None:
    """``[start, end)`` must be a non-empty span of the model's blocks."""
    n = identity.num_blocks
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= n):
        raise ValueError(f"blocks {start}:{end} are not a span of {identity.model_id}'s {n} blocks: "
                         f"give 0 <= start < end <= {n}")


def check_hidden(config: Any, hidden: Any) -> None:
    """``hidden`` must be finite floating-point hidden states [batch, tokens, hidden_size]."""
    size = config.hidden_size
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        kind = f"{hidden.dtype} values" if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be floating-point hidden states [batch, tokens, {size}], got {kind}; "
                         "token ids become hidden states through model.head.embed(ids)")
    if hidden.dim() != 3 or hidden.shape[2] != size or 0 in hidden.shape:
        raise ValueError(f"hidden has shape {list(hidden.shape)}; expected [batch, tokens, {size}]")
    if not bool(torch.isfinite(hidden).all()):
        raise ValueError("hidden holds NaN or infinite values")


def check_length(identity: ModelIdentity, config: Any, length: int, what: str) -> None:
    """A session of ``length`` tokens (``what`` says what made it so long) within the model's context."""
    limit = context_length(config)
    if not 1 <= length <= limit:
        raise ValueError(f"{what}: {length} tokens, beyond {identity.model_id}'s context of {limit} tokens")


def generate_prompt(identity: ModelIdentity, config: Any, input_ids: Any, max_new_tokens: int, top_p: float,
                    speculate: int, prefix_length: int = 0) -> torch.Tensor:
    """``generate``'s prompt as token ids [batch, tokens], its settings checked."""
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    check_length(identity, config, input_ids.shape[1] + prefix_length + max_new_tokens,
                 f"the prompt ({input_ids.shape[1]} tokens) and max_new_tokens ({max_new_tokens})")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= speculate <= MAX_SPECULATE or speculate and input_ids.shape[0] != 1:
        raise ValueError(f"speculate drafts up to K tokens per step, 1 <= K <= {MAX_SPECULATE} (0: off), for "
                         f"one sequence at a time; got {speculate} for {input_ids.shape[0]} sequence(s)")
    return input_ids
