"""Speculative decoding in-process: the acceptance rule, prompt lookup, the choice of K, and a
statistical test that sampled output follows the model's distribution exactly.

The statistical tests run ``SpeculativeDecoder`` (the loop ``generate(..., speculate=K)`` runs)
against a small Markov model whose next-token distribution depends on the last token, so that
the exact probability of every 3-token continuation is known. Chi-square goodness of fit against
it, with the p-value from the regularized upper incomplete gamma function (torch.special.gammaincc):
a correct sampler fails with probability 1e-4 per check over the choice of seed (the seeds are
fixed, so the result is too); a sampler that lies about its draft distribution is caught.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from petald.kernels.drafters.prompt_lookup import PromptLookupDrafter
from petald.kernels.sampling import sample_next, target_probs
from petald.kernels.speculative_sampling import accept_drafts
from petald.p2pnode.client.draft_length import PROBE_EVERY, DraftLength, expected_tokens
from petald.p2pnode.client.speculation import SpeculativeDecoder

VOCAB = 4
NEW = 3
PROMPT = [0, 1, 2, 0, 1, 2, 0]
TABLE = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(7)) * 1.5  # logits after each token
FALSE_FAILURE = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """Ops on [4, 4] tensors: with two threads on a loaded machine each softmax waits milliseconds
    for the other thread (measured: 14 ms against 2 us on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class MarkovSession:
    """A session on a model whose logits after a token are ``TABLE[token]``: holds its tokens, verifies
    a step's tokens, and rolls back as an inference session does."""

    def __init__(self, prompt: list[int]):
        self.held = list(prompt)

    def verify(self, ids: list[int]) -> torch.Tensor:
        self.held += ids
        return TABLE[ids]

    def rollback(self, dropped: int) -> None:
        assert 0 < dropped < len(self.held)
        del self.held[-dropped:]


class TableDrafter:
    """A draft model: draws each draft from softmax(``table[last]``) and says so (or, ``lying``, claims uniform)."""

    def __init__(self, table: torch.Tensor, generator: torch.Generator, lying: bool = False):
        self.table, self.generator, self.lying = table, generator, lying

    def draft(self, context: list[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        tokens, probs, last = [], [], context[-1]
        for _ in range(k):
            q = torch.softmax(self.table[last], dim=-1)
            last = int(torch.multinomial(q, 1, generator=self.generator))
            tokens.append(last)
            probs.append(torch.full((VOCAB,), 1 / VOCAB) if self.lying else q)
        return tokens, torch.stack(probs) if probs else None


def exact_distribution(temperature: float, top_p: float) -> torch.Tensor:
    """The probability of each 3-token continuation of PROMPT, in itertools.product order."""
    p = target_probs(TABLE, temperature, top_p)
    p = p / p.sum(dim=-1, keepdim=True)
    out = []
    for seq in itertools.product(range(VOCAB), repeat=NEW):
        prob, last = 1.0, PROMPT[-1]
        for token in seq:
            prob, last = prob * float(p[last, token]), token
        out.append(prob)
    return torch.tensor(out, dtype=torch.float64)


def counts(runs: list[list[int]]) -> torch.Tensor:
    index = {seq: i for i, seq in enumerate(itertools.product(range(VOCAB), repeat=NEW))}
    out = torch.zeros(len(index), dtype=torch.float64)
    for seq in runs:
        out[index[tuple(seq)]] += 1
    return out


def chi_square_p_value(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness of fit; categories of probability 0 must not be observed."""
    if bool((observed[probs == 0] > 0).any()):
        return 0.0
    expected = observed.sum() * probs
    live = probs > 0
    stat = float((((observed - expected) ** 2)[live] / expected[live]).sum())
    df = int(live.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def speculative_runs(n: int, temperature: float, top_p: float, drafter_for, speculate: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(11)
    runs = []
    for _ in range(n):
        session = MarkovSession(PROMPT)
        decoder = SpeculativeDecoder(session.verify, session.rollback, drafter_for(generator), speculate)
        runs.append(decoder.run(PROMPT, TABLE[PROMPT[-1]], NEW, (), temperature, top_p, generator))
        assert session.held == PROMPT + runs[-1][:-1]  # the session holds every kept token but the last
    return runs


def plain_runs(n: int, temperature: float, top_p: float) -> list[list[int]]:
    generator = torch.Generator().manual_seed(13)
    runs = []
    for _ in range(n):
        last, seq = PROMPT[-1], []
        for _ in range(NEW):
            last = int(sample_next(TABLE[last][None], temperature, top_p, generator)[0])
            seq.append(last)
        runs.append(seq)
    return runs


RUNS = 3000


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampled_speculation_follows_the_models_distribution(temperature, top_p):
    exact = exact_distribution(temperature, top_p)
    assert chi_square_p_value(counts(plain_runs(RUNS, temperature, top_p)), exact) > FALSE_FAILURE
    lookup = speculative_runs(RUNS, temperature, top_p, lambda g: PromptLookupDrafter())
    assert chi_square_p_value(counts(lookup), exact) > FALSE_FAILURE
    draft_table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(8))
    drafted = speculative_runs(RUNS, temperature, top_p, lambda g: TableDrafter(draft_table, g))
    assert chi_square_p_value(counts(drafted), exact) > FALSE_FAILURE


def test_the_statistical_check_catches_a_drafter_that_misstates_its_distribution():
    draft_table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(8)) * 3
    lying = speculative_runs(RUNS, 1.0, 1.0, lambda g: TableDrafter(draft_table, g, lying=True))
    assert chi_square_p_value(counts(lying), exact_distribution(1.0, 1.0)) < FALSE_FAILURE


def test_greedy_acceptance_keeps_drafts_while_they_are_the_argmax():
    logits = torch.tensor([[0.0, 5, 0], [9, 0, 0], [0, 0, 1], [1, 0, 0]])
    assert accept_drafts(logits, [1, 0, 1]) == (2, 2)  # third draft refused: the model says 2
    assert accept_drafts(logits[:1], []) == (0, 1)
    assert accept_drafts(logits, [1, 0, 2]) == (3, 0)  # all kept, one more token
    with pytest.raises(ValueError, match=r"logits have shape \[4, 3\]; expected \[3, vocab\]"):
        accept_drafts(logits, [1, 0])


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    drafter = PromptLookupDrafter(max_ngram=2)
    assert drafter.draft([5, 6, 7, 8, 5, 6, 9, 1, 5, 6], 3) == ([9, 1, 5], None)  # latest "5 6"
    assert drafter.draft([1, 2, 3, 4, 2], 5) == ([3, 4, 2], None)  # shorter matches too, up to the end
    assert drafter.draft([1, 2, 3, 4], 2) == ([], None)  # nothing repeats
    assert drafter.draft([1, 2, 1], 0) == ([], None)


def test_draft_length_grows_with_acceptance_and_backs_off_to_plain_decoding():
    steady = DraftLength(8)
    for _ in range(20):  # every draft kept; a step costs 10 ms plus 0.1 ms a token
        k = steady.next_k(100)
        steady.record(k, k, 0.010 + 0.0001 * (k + 1))
    assert steady.next_k(100) == 8
    assert steady.next_k(3) == 3  # never more than is left to generate
    failing = DraftLength(8)
    for _ in range(20):
        k = failing.next_k(100)
        if k == 0:
            break
        failing.record(k, 0, 0.010 + 0.004 * (k + 1))  # every draft refused, each token costly
    assert k == 0 and failing.first < 0.25
    for _ in range(PROBE_EVERY - 1):
        failing.record(0, 0, 0.014)
    assert failing.next_k(100) == 0
    failing.record(0, 0, 0.014)
    assert failing.next_k(100) > 0  # a probe: the text may have turned repetitive
    assert expected_tokens(0.5, 0.5, 2) == 1.75 and expected_tokens(1.0, 1.0, 3) == 4
    bursty = DraftLength(8)
    for _ in range(30):  # 4 in 10 steps copy 8 tokens, the others keep nothing; a step costs 100 ms + 2 ms a token
        for kept in (8, 0, 0, 8, 0, 8, 0, 0, 8, 0):
            bursty.record(8, kept, 0.100 + 0.002 * 9)
    assert bursty.next_k(100) == 8  # runs of kept drafts make long drafts worth their cost
    with pytest.raises(ValueError, match="speculate must be 1 to 15 draft tokens, got 0"):
        DraftLength(0)


def test_a_draft_model_drafts_its_greedy_tokens_and_follows_the_context_back(tiny_models):
    """The draft model's drafts are transformers' greedy tokens of the same weights, also after the
    context it drafted for was cut back (drafts refused) and grew another way."""
    from petald.kernels.drafters.draft_model import DraftModelDrafter
    from petald.kernels.sources.open_source import open_source
    from tests.oracle import reference_greedy

    path = str(tiny_models["llama"])
    drafter = DraftModelDrafter(open_source(path), vocab_size=open_source(path).config.vocab_size)
    context = torch.randint(0, 320, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    drafts, probs = drafter.draft(context, 4)
    assert probs is None and drafts == reference_greedy(path, torch.tensor([context]), 4)
    other = context[:10] + [(drafts[0] + 1) % 320, 7]  # diverges before the end of what it holds
    again = drafter.draft(other, 3)[0]
    assert again == reference_greedy(path, torch.tensor([other]), 3)
    assert drafter.held == other + again[:2]  # the drafts but the last are in its cache
    with pytest.raises(ValueError, match="a vocabulary of 320 tokens, the model 321: a draft model must share"):
        DraftModelDrafter(open_source(path), vocab_size=321)
