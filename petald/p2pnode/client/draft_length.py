"""How many tokens to draft before each verify step: K adapts to what drafting has been worth.

Each verify step costs about one trip through the chain plus a little compute per token sent,
and yields the drafts the model keeps plus one token. With a per-draft acceptance rate ``a``
(each draft kept with probability a, given the previous one was), k drafts yield on average
1 + a + ... + a^k tokens. The rule picks the k up to the user's limit that maximizes tokens per
second: yield(k) / (trip + k * per_token), with ``a`` and the costs measured on this session's
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


def expected_tokens(acceptance: float, k: int) -> float:
    """What a verify step of ``k`` drafts yields on average: 1 + a + a^2 + ... + a^k."""
    return float(k + 1) if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)


class DraftLength:
    def __init__(self, k_max: int):
        if not 1 <= k_max <= MAX_SPECULATE:
            raise ValueError(f"speculate must be 1 to {MAX_SPECULATE} draft tokens, got {k_max}")
        self.k_max = k_max
        self.kept = 1.0  # decayed counts of drafts kept and refused; the prior: a = 0.5
        self.refused = 1.0
        self.samples: deque[tuple[int, float]] = deque(maxlen=WINDOW)
        self.plain_streak = 0

    @property
    def acceptance(self) -> float:
        return self.kept / (self.kept + self.refused)

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
        a = self.acceptance
        best = max(range(most + 1), key=lambda k: expected_tokens(a, k) / (trip + (k + 1) * per_token))
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
        self.kept = DECAY * self.kept + kept
        self.refused = DECAY * self.refused + (1 if kept < drafted else 0)
