"""A swarm at internet distances on 127.0.0.1: servers behind delay proxies, announcing the proxies'
addresses (``--announce``), so that every connection to them crosses a fixed one-way delay each way."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest
import torch

from benchmarks.delay_proxy import DelayProxy
from petald.cli.local_swarm import LocalSwarm
from petald.p2pnode.client.distributed_model import DistributedModel
from tests.oracle import reference_greedy
from tests.tiny_models import TINY_BLOCKS

pytestmark = pytest.mark.slow

ONE_WAY_S = 0.050  # 100 ms round trips: a client in Europe and servers across the Atlantic


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _swarm(spans: list[str], model: str, delayed: list[bool]) -> Iterator[LocalSwarm]:
    """Servers for ``spans``; ``delayed[i]``: the i-th listens on a port of its own behind a proxy
    ``ONE_WAY_S`` away and announces only the proxy's address."""
    with contextlib.ExitStack() as stack:
        server_args: list[list[str]] = []
        for behind_proxy in delayed:
            if not behind_proxy:
                server_args.append([])
                continue
            port = _free_port()
            proxy = stack.enter_context(DelayProxy(("127.0.0.1", port), ONE_WAY_S))
            server_args.append(["--listen", f"/ip4/127.0.0.1/tcp/{port}",
                                "--announce", f"/ip4/127.0.0.1/tcp/{proxy.port}"])
        yield stack.enter_context(LocalSwarm(spans, model=model, extra_args=["--threads", "1"],
                                             server_args=server_args))


def test_a_whole_generation_through_hops_100_ms_round_trip_gives_the_oracles_tokens(tiny_models):
    """Every hop (client to server, server to server, the DHT) crosses a proxy: each timeout on the
    way (dial, DHT lookups, session open, steps, pushes) holds at 100 ms round trips."""
    path = str(tiny_models["llama"])
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(5))
    expected = reference_greedy(path, ids, 8)
    with _swarm(["0:2", "2:4", "4:6"], path, [True, True, True]) as swarm, \
            DistributedModel(model=path, initial_peers=swarm.addresses[:1]) as model:
        route = model.route()
        assert len(route.hops) == 3
        # The route's round trips are measured, through the proxies: at least two one-way delays.
        assert all(hop.server.rtt >= 2 * ONE_WAY_S for hop in route.hops)
        out = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert out[0, ids.shape[1]:].tolist() == expected


def test_the_client_takes_the_nearer_of_two_servers_of_the_same_span(tiny_models):
    """Two servers of the whole model, one of them 100 ms away: the client measures both round
    trips and routes through the near one. (The second server starts once the first is up and
    reuses its measured throughput, so their announced figures are equal: only the distance differs.)"""
    path = str(tiny_models["llama"])
    span = f"0:{TINY_BLOCKS}"
    for far_first in (True, False):  # whichever joins first, whichever the client is told of
        delayed = [far_first, not far_first]
        with _swarm([span, span], path, delayed) as swarm, \
                DistributedModel(model=path, initial_peers=swarm.addresses[:1]) as model:
            rtts = {s.peer_id: s.rtt for s in model.servers}
            far, near = (swarm.addresses[delayed.index(d)].rsplit("/", 1)[1] for d in (True, False))
            assert set(rtts) == {far, near}
            assert rtts[far] >= 2 * ONE_WAY_S > rtts[near]
            assert [hop.server.peer_id for hop in model.route().hops] == [near]
