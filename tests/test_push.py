"""Servers pushing step outputs to the next server, with real server processes: the tokens are
transformers' own, with pushes, without them, when a push cannot be delivered, when a push is
lost on the way, and when a server dies mid-generation (last: it kills a server of the module's
swarm)."""

from __future__ import annotations

import dataclasses
import signal

import pytest
import torch

from petald.cli.local_swarm import LocalSwarm
from petald.p2pnode.client import remote_span
from petald.p2pnode.client.distributed_model import DistributedModel
from petald.p2pnode.client.inference_session import InferenceSession
from petald.p2pnode.client.remote_span import RemoteSpanSession
from tests.oracle import reference_greedy

pytestmark = pytest.mark.slow

IDS = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(21))
NEW_TOKENS = 14
SPANS = ["0:2", "2:4", "2:4", "4:6"]  # a 3-hop route, with a spare for its middle
NOBODY = "12D3KooWLshnq6TvssFMhSmSWnA2BbJjLsUyW1PRy6dcDC61H1mw"


@pytest.fixture(scope="module")
def path(tiny_models) -> str:
    return str(tiny_models["llama"])


@pytest.fixture(scope="module")
def swarm(path):
    with LocalSwarm(SPANS, model=path, extra_args=["--threads", "1"]) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def expected(path) -> list[int]:
    return reference_greedy(path, IDS, NEW_TOKENS)


def _generate(model: DistributedModel, fault_after: int | None = None,
              fault=None) -> tuple[list[int], InferenceSession, list[int]]:
    """Greedy tokens, the session, and how many hop steps had been pushed after each step."""
    tokens: list[int] = []
    pushed: list[int] = []
    with model.inference_session(1, IDS.shape[1] + NEW_TOKENS) as session:
        assert len(session.route.hops) == 3
        hidden = model.node.call(session.step, model.head.embed(IDS))
        for i in range(NEW_TOKENS):
            nxt = model.head.logits(hidden[:, -1]).argmax(-1)
            tokens.append(int(nxt[0]))
            if i == fault_after:
                fault(session)
            hidden = model.node.call(session.step, model.head.embed(nxt[:, None]))
            pushed.append(session.pushed_steps)
    return tokens, session, pushed


def test_pushed_steps_give_the_oracles_greedy_tokens(swarm, path, expected):
    with DistributedModel(swarm.addresses, path) as model:
        tokens, _, pushed = _generate(model)
    assert tokens == expected
    # Of each step's 3 hops, the last two get their input by push once the push streams are
    # open (they open in the background during the first steps).
    assert pushed[-1] - pushed[-3] == 2 * 2, pushed
    with DistributedModel(swarm.addresses, path, push=False) as model:
        tokens, _, pushed = _generate(model)
    assert tokens == expected
    assert pushed[-1] == 0


@pytest.fixture
def unreachable_push_targets(monkeypatch):
    """Clients name push targets at a peer no server knows how to reach."""
    named = RemoteSpanSession.push_target

    def nowhere(self: RemoteSpanSession):
        target = named(self)
        return None if target is None else dataclasses.replace(target, peer_id=NOBODY)

    monkeypatch.setattr(RemoteSpanSession, "push_target", nowhere)


def test_a_push_the_server_cannot_deliver_falls_back_to_the_client(swarm, path, expected, unreachable_push_targets):
    with DistributedModel(swarm.addresses, path) as model:
        tokens, session, pushed = _generate(model)
    assert tokens == expected
    assert pushed[-1] == 0 and not session.recoveries


def test_a_push_lost_on_the_way_is_sent_by_the_client_after_a_grace(swarm, path, expected, monkeypatch,
                                                                     unreachable_push_targets):
    """The servers cannot push (their target is unreachable), yet every answer claims the step was
    pushed: the client waits for answers that do not come until it sends each step itself."""
    honest = remote_span.StepOutput

    class ClaimsPushed(honest):
        @classmethod
        def from_wire(cls, msg):
            return dataclasses.replace(honest.from_wire(msg), pushed=True)

    monkeypatch.setattr(remote_span, "StepOutput", ClaimsPushed)
    monkeypatch.setattr(remote_span, "PUSH_GRACE_MIN_S", 0.05)
    with DistributedModel(swarm.addresses, path) as model:
        tokens, session, pushed = _generate(model)
    assert tokens == expected
    assert pushed[-1] == 2 * (NEW_TOKENS + 1) and not session.recoveries


def test_a_server_killed_between_pushes_changes_no_token(swarm, path, expected):
    killed = []

    def kill_the_middle(session: InferenceSession) -> None:
        middle = session.route.hops[1].server.peer_id
        victim = next(s for s in swarm.servers if s.address.endswith(middle))
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)
        killed.append(middle)

    with DistributedModel(swarm.addresses, path) as model:
        tokens, session, pushed = _generate(model, fault_after=5, fault=kill_the_middle)
    assert tokens == expected
    assert [r.peer_id for r in session.recoveries] == killed, [(r.peer_id[-6:], r.start, r.end, r.reason) for r in session.recoveries]
    # Pushes resume through the replacement (its push stream opens in the background).
    assert pushed[-1] > pushed[5], pushed
