"""Rollback and speculative decoding through real server processes (3 hops, pushes on): a rolled
back session computes what transformers computes on the kept sequence; greedy speculative output
is transformers' greedy output token for token, alone, beside another session decoding at the
same time (batched with it on each server), and when a server is killed mid-speculation (last:
it kills a middle server of the swarm test_push.py shares)."""

from __future__ import annotations

import signal
import threading

import pytest
import torch

from petald.kernels.drafters.draft_model import DraftModelDrafter
from petald.kernels.drafters.prompt_lookup import PromptLookupDrafter
from petald.kernels.sources.open_source import open_source
from petald.p2pnode.client.distributed_model import DistributedModel
from tests.oracle import reference_greedy, reference_logits

pytestmark = pytest.mark.slow

_gen = torch.Generator().manual_seed(4)
PATTERN = torch.randint(0, 320, (1, 6), generator=_gen)
IDS = torch.cat([PATTERN, PATTERN, PATTERN[:, :4]], dim=1)  # repeats: prompt lookup finds drafts
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def path(tiny_models) -> str:
    return str(tiny_models["llama"])  # three_hop_swarm's model (conftest.py)


@pytest.fixture(scope="module")
def expected(path) -> list[int]:
    return reference_greedy(path, IDS, NEW_TOKENS)


def _speculated(model: DistributedModel, **kwargs) -> list[int]:
    out = model.generate(IDS, max_new_tokens=NEW_TOKENS, speculate=4, eos_token_id=[], **kwargs)
    stats = model.last_speculation
    # Drafts were sent, some kept and some refused (so sessions were rolled back), or the test proves little.
    assert 0 < stats.kept < stats.drafted, stats
    assert stats.tokens == NEW_TOKENS and stats.steps < NEW_TOKENS
    return out[0, IDS.shape[1]:].tolist()


def test_a_rolled_back_session_computes_the_kept_sequence(three_hop_swarm, path):
    gen = torch.Generator().manual_seed(9)
    first, second = torch.randint(0, 320, (1, 12), generator=gen), torch.randint(0, 320, (1, 5), generator=gen)
    with DistributedModel(three_hop_swarm.addresses, path, wire="float32") as model:
        with model.inference_session(1, 32) as session:
            model.node.call(session.step, model.head.embed(first[:, :9]))
            model.node.call(session.step, model.head.embed(first[:, 9:]))  # 3 tokens, pushed between servers
            session.rollback(10)
            assert [sum(x.shape[1] for x in link.inputs) for link in session.links] == [10, 10, 10]
            out = model.head.logits(model.node.call(session.step, model.head.embed(second)))
            with pytest.raises(ValueError, match="cannot roll back to position 16: the session holds 15 tokens"):
                session.rollback(16)
    kept = torch.cat([first[:, :10], second], dim=1)
    torch.testing.assert_close(out, reference_logits(path, kept)[:, 10:], atol=1e-4, rtol=1e-4)


def test_greedy_speculation_gives_the_oracles_tokens(three_hop_swarm, path, expected):
    with DistributedModel(three_hop_swarm.addresses, path, wire="float32") as model:
        assert _speculated(model) == expected
        with pytest.raises(ValueError, match="for one sequence at a time; got 4 for 2 sequence"):
            model.generate(IDS.expand(2, -1), speculate=4)


def test_speculation_batched_with_another_session_gives_the_oracles_tokens(three_hop_swarm, path, expected):
    other_ids = torch.randint(0, 320, (1, 7), generator=torch.Generator().manual_seed(5))
    other: list[list[int]] = []
    with DistributedModel(three_hop_swarm.addresses, path, wire="float32") as model, \
            DistributedModel(three_hop_swarm.addresses, path, wire="float32") as neighbour:
        thread = threading.Thread(target=lambda: other.append(neighbour.generate(
            other_ids, max_new_tokens=NEW_TOKENS, eos_token_id=[])[0, 7:].tolist()))
        thread.start()
        try:
            tokens = _speculated(model)
        finally:
            thread.join(120)
    assert tokens == expected
    assert other == [reference_greedy(path, other_ids, NEW_TOKENS)]


def test_a_draft_model_gives_the_oracles_tokens(three_hop_swarm, path, expected):
    """The same weights as draft model: nearly every draft is kept (float rounding may differ)."""
    with DistributedModel(three_hop_swarm.addresses, path, wire="float32") as model:
        drafter = DraftModelDrafter(open_source(path), model.config.vocab_size)
        out = model.generate(IDS, max_new_tokens=NEW_TOKENS, speculate=4, eos_token_id=[], drafter=drafter)
    assert out[0, IDS.shape[1]:].tolist() == expected
    stats = model.last_speculation
    assert stats.acceptance_rate > 0.9 and stats.steps < NEW_TOKENS // 2, stats


class KillingDrafter(PromptLookupDrafter):
    """Prompt lookup that kills a server of the route after its ``after``-th draft."""

    def __init__(self, kill, after: int):
        super().__init__()
        self.kill, self.after, self.calls = kill, after, 0

    def draft(self, context: list[int], k: int):
        self.calls += 1
        if self.calls == self.after:
            self.kill()
        return super().draft(context, k)


def test_a_server_killed_mid_speculation_changes_no_token(three_hop_swarm, path, expected):
    killed: list[str] = []
    with DistributedModel(three_hop_swarm.addresses, path, wire="float32") as model:
        def kill_the_middle() -> None:
            middle = model.last_route.hops[1].server.peer_id
            victim = next(s for s in three_hop_swarm.servers if s.address.endswith(middle))
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(10)
            killed.append(middle)

        model.generate(IDS, max_new_tokens=2)  # learns the route the next session takes
        tokens = _speculated(model, drafter=KillingDrafter(kill_the_middle, after=4))
    assert tokens == expected
    assert [(r.peer_id, r.start, r.end) for r in model.recoveries] == [(killed[0], 2, 4)], model.recoveries
