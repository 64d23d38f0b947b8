"""How many tokens to draft before each verify step: K adapts to what drafting has been worth.

Each verify step costs about one trip through the chain plus a little compute per token sent,
and yields the drafts the model keeps plus one token. Drafts are kept in runs: where the text
copies its context, a kept draft is most often followed by another, while the first draft of a
step is a guess. So two rates are measured: ``first``, that a step's first draft is kept, and
``then``, that a draft is kept given the previous one was; k drafts yield on average
1 + first * (1 + then + ... + then^(k-1)) tokens. (One rate for both, measured on an edit task
with SmolLM2, undercounted long drafts and kept K near 3 where 8 yields 20% more tokens a step.)
The rule picks the k up to the user's limit that maximizes tokens per second:
yield(k) / (trip + (k + 1) * per_token), with the rates and the costs measured on this session's
own steps. Where drafts keep failing, the best k is 0: plain decoding, with a probe now and then
in case the text turns repetitive.
"""

from __future__ import annotations

from collections import deque

# The most drafts a verify step may carry: with the token before them, a step of at most 16 tokens,
# which servers push on to the next server (inference_session.PUSH_MAX_ROWS), as decode steps.
MAX_SPECULATE = 15
DECAY = 0.9  # weight of the past in the acceptance counts, per verify step
WINDOW = 32  # steps whose (tokens sent, seconds) estimate the costs
PROBE_EVERY = 8  # plain steps in a row before drafting is tried again
PROBE_K = 2
# Per extra token, as a share of a step's time, until steps of different lengths have been measured.
DEFAULT_TOKEN_SHARE = 0.1


def expected_tokens(first: float, then: float, k: int) -> float:
    """What a verify step of ``k`` drafts yields on average: 1 + first * (1 + then + ... + then^(k-1))."""
    if k <= 0:
        return 1.0
    return 1 + first * (k if then >= 1 else (1 - then ** k) / (1 - then))


class DraftLength:
    def __init__(self, k_max: int):
        if not 1 <= k_max <= MAX_SPECULATE:
            raise ValueError(f"speculate must be 1 to {MAX_SPECULATE} draft tokens, got {k_max}")
        self.k_max = k_max
        # Decayed counts of first drafts kept and refused, and of later ones; the priors: 0.5 each.
        self.first_kept = self.first_refused = self.then_kept = self.then_refused = 1.0
        self.samples: deque[tuple[int, float]] = deque(maxlen=WINDOW)
        self.plain_streak = 0

    @property
    def first(self) -> float:
        """How often a step's first draft is kept."""
        return self.first_kept / (self.first_kept + self.first_refused)

    @property
    def then(self) -> float:
        """How often a draft is kept after a kept one."""
        return self.then_kept / (self.then_kept + self.then_refused)

    def costs(self) -> tuple[float, float]:
        """(a step's fixed seconds: the trip, seconds per token sent), fitted to the steps measured."""
        if not self.samples:
            return 1.0, DEFAULT_TOKEN_SHARE
        n = len(self.samples)
        mean_t = sum(t for t, _ in self.samples) / n
        mean_s = sum(s for _, s in self.samples) / n
        spread = sum((t - mean_t) ** 2 for t, _ in self.samples)
        if spread == 0:  # one length only: the slope cannot be fitted yet
            return mean_s, DEFAULT_TOKEN_SHARE * mean_s
        slope = max(0.0, sum((t - mean_t) * (s - mean_s) for t, s in self.samples) / spread)
        return max(mean_s - slope * mean_t, 1e-6), slope

    def next_k(self, limit: int) -> int:
        """The number of drafts for the next verify step, at most ``limit`` (what is left to generate)."""
        most = min(self.k_max, limit)
        if most <= 0:
            return 0
        trip, per_token = self.costs()
        first, then = self.first, self.then
        best = max(range(most + 1), key=lambda k: expected_tokens(first, then, k) / (trip + (k + 1) * per_token))
        if best == 0 and self.plain_streak >= PROBE_EVERY:
            return min(PROBE_K, most)
        return best

    def record(self, drafted: int, kept: int, seconds: float) -> None:
        """A verify step of ``drafted`` drafts, ``kept`` of them kept, answered in ``seconds``."""
        self.samples.append((drafted + 1, seconds))
        if drafted == 0:
            self.plain_streak += 1
            return
        self.plain_streak = 0
        self.first_kept = DECAY * self.first_kept + (kept > 0)
        self.first_refused = DECAY * self.first_refused + (kept == 0)
        self.then_kept = DECAY * self.then_kept + max(0, kept - 1)
        self.then_refused = DECAY * self.then_refused + (0 < kept < drafted)
