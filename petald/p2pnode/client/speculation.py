"""Speculative decoding through the swarm: fewer trips through the chain per token, same tokens.

Each verify step sends the last chosen token and up to K drafted ones (``kernels/drafters/``) through
the whole chain as one multi-token step. The model's logits at each of those positions say which
drafts it keeps (``kernels/speculative_sampling.py``: greedy output is plain decoding's, token
for token; sampled output follows the model's distribution exactly); the session is rolled back
past the kept ones (``InferenceSession.rollback``: the servers drop the rest's keys and values
with the next step), and the token the model added is the next step's first. K adapts to what
drafting has been worth (``draft_length.py``). docs/speculation.md tells the whole story.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from petald.kernels.drafters.prompt_lookup import PromptLookupDrafter
from petald.kernels.sampling import sample_next
from petald.kernels.speculative_sampling import accept_drafts
from petald.p2pnode.client.draft_length import DraftLength

if TYPE_CHECKING:
    from petald.p2pnode.client.distributed_model import DistributedModel
    from petald.p2pnode.client.inference_session import InferenceSession


class Drafter(Protocol):
    def draft(self, context: list[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``k`` tokens to follow ``context``, and the distribution each was drawn from
        ([drafts, vocab]), or None where the drafts are deterministic."""
        ...


@dataclass
class SpeculationStats:
    """What speculation did in one generation: verify steps, drafts sent and kept, tokens made."""

    steps: int = 0
    drafted: int = 0
    kept: int = 0
    tokens: int = 0
    k_chosen: list[int] = field(default_factory=list)  # K of each verify step

    def count(self, drafted: int, kept: int) -> None:
        """One verify step of ``drafted`` drafts, ``kept`` of them kept."""
        self.steps += 1
        self.drafted += drafted
        self.kept += kept
        self.k_chosen.append(drafted)

    @property
    def acceptance_rate(self) -> float:
        return self.kept / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def mean_k(self) -> float:
        return sum(self.k_chosen) / len(self.k_chosen) if self.k_chosen else 0.0


class SpeculativeDecoder:
    """Decodes one sequence (batch 1) through ``verify`` and ``rollback``.

    ``verify(ids)`` runs ``ids`` (a list of token ids) as the next step at the session's position and
    returns the logits at each of them, [len(ids), vocab]; ``rollback(n)`` makes the session forget
    its last ``n`` tokens."""

    def __init__(self, verify: Callable[[list[int]], torch.Tensor], rollback: Callable[[int], None],
                 drafter: Drafter, speculate: int):
        self.verify, self.rollback, self.drafter = verify, rollback, drafter
        self.length = DraftLength(speculate)
        self.stats = SpeculationStats()

    def run(self, context: Sequence[int], last_logits: torch.Tensor, max_new_tokens: int,
            end_of_sequence: Sequence[int] = (), temperature: float = 0.0, top_p: float = 1.0,
            generator: torch.Generator | None = None,
            streamer: Callable[[torch.Tensor], None] | None = None) -> list[int]:
        """New tokens after ``context`` (which the session holds whole; ``last_logits`` [vocab] are the
        model's after its last token), up to ``max_new_tokens`` or an end-of-sequence token included.
        ``streamer`` hears each token as a tensor [1], like generate's."""
        context = list(context)
        new: list[int] = []
        eos = set(end_of_sequence)

        def emit(token: int) -> bool:
            """Add ``token``; whether generation is over."""
            new.append(token)
            context.append(token)
            self.stats.tokens += 1
            if streamer is not None:
                streamer(torch.tensor([token]))
            return token in eos or len(new) == max_new_tokens

        if max_new_tokens <= 0 or emit(int(sample_next(last_logits[None], temperature, top_p, generator)[0])):
            return new
        while True:
            k = self.length.next_k(max_new_tokens - len(new) - 1)
            drafts, draft_probs = self.drafter.draft(context, k) if k > 0 else ([], None)
            drafts, draft_probs = drafts[:k], draft_probs[:k] if draft_probs is not None else None
            began = time.perf_counter()
            logits = self.verify([context[-1], *drafts])
            seconds = time.perf_counter() - began
            kept, added = accept_drafts(logits, drafts, temperature, top_p, generator, draft_probs)
            self.length.record(len(drafts), kept, seconds)
            self.stats.count(len(drafts), kept)
            if kept < len(drafts):  # the servers drop the refused drafts' keys and values with the next step
                self.rollback(len(drafts) - kept)
            for token in [*drafts[:kept], added]:
                if emit(token):
                    return new


def speculate_through(model: DistributedModel, session: InferenceSession, input_ids: torch.Tensor,
                      hidden: torch.Tensor, max_new_tokens: int, end_of_sequence: Sequence[int], speculate: int,
                      drafter: Drafter | None = None, temperature: float = 0.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None,
                      streamer: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """``DistributedModel.generate(..., speculate=K)`` once the prompt ``input_ids`` [1, T] has run
    through ``session`` (``hidden``: its output): prompt and new tokens, [1, length], as generate
    returns them. ``model.last_speculation`` gets what speculation did."""
    def verify(ids: list[int]) -> torch.Tensor:
        return model.head.logits(model._step(session, model.head.embed(torch.tensor([ids]))))[0]

    def rollback(dropped: int) -> None:
        session.rollback(session.position - dropped)

    decoder = SpeculativeDecoder(verify, rollback, drafter or PromptLookupDrafter(), speculate)
    model.last_speculation = decoder.stats
    new = decoder.run(input_ids[0].tolist(), model.head.logits(hidden[0, -1]), max_new_tokens, end_of_sequence,
                      temperature, top_p, generator, streamer)
    model.metrics.tokens_generated.inc(len(new))
    return torch.cat([input_ids, torch.tensor([new], dtype=torch.long)], dim=1)
