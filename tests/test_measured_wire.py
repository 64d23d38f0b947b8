"""``wire="auto"`` on a measured link: a server behind a delay proxy with a bandwidth cap, announcing
no bandwidth (no ``--network-mbps``). The client's first session goes 16-bit (nothing known); its
long prompt measures the link (client/link_bandwidth.py), and the next session goes int8 where the
link is slow, 16-bit where it is not."""

from __future__ import annotations

import socket

import pytest
import torch

from benchmarks.delay_proxy import DelayProxy
from petald.cli.local_swarm import LocalSwarm
from petald.p2pnode.client.distributed_model import DistributedModel
from petald.p2pnode.client.inference_session import InferenceSession
from tests.tiny_models import TINY_BLOCKS

pytestmark = pytest.mark.slow

ONE_WAY_S = 0.005
# A decode step of BATCH rows of the tiny model (hidden 64) is 2 KiB at 16 bits: at 0.5 Mbit/s
# that is 33 ms, more than a fifth of any round trip this loopback measures, so int8; the prompt
# (BATCH x PROMPT_TOKENS, ~130 KB both ways) takes ~2 s to cross, far above the sample thresholds.
CAP_MBPS = 0.5
BATCH = 16
PROMPT_TOKENS = 32


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wires(session: InferenceSession) -> list[str]:
    return [link.span.wire for link in session.links if link.span is not None]


@pytest.mark.parametrize("cap_mbps, later_wire", [(CAP_MBPS, "int8"), (None, "float16")])
def test_a_link_measured_slow_gets_int8_in_the_next_session(tiny_models, cap_mbps, later_wire):
    path = str(tiny_models["llama"])
    port = _free_port()
    hidden = torch.randn(BATCH, PROMPT_TOKENS + 1, 64, generator=torch.Generator().manual_seed(3))
    with DelayProxy(("127.0.0.1", port), ONE_WAY_S, mbps=cap_mbps) as proxy, \
            LocalSwarm([f"0:{TINY_BLOCKS}"], model=path, extra_args=["--threads", "1"],
                       server_args=[["--listen", f"/ip4/127.0.0.1/tcp/{port}",
                                     "--announce", f"/ip4/127.0.0.1/tcp/{proxy.port}"]]) as swarm, \
            DistributedModel(model=path, initial_peers=swarm.addresses) as model:
        (server,) = model.servers
        assert server.network_mbps == 0.0 and server.rtt >= 2 * ONE_WAY_S  # nothing announced; behind the proxy
        with model.inference_session(batch=BATCH, max_length=64) as session:
            assert _wires(session) == ["float16"]  # nothing measured yet
            model.node.call(session.step, hidden[:, :PROMPT_TOKENS])
            held = session.links[0].span.held_seconds  # the server says how long it held the step
            assert held is not None and 0 <= held < session.links[0].span.step_seconds
        measured = model.bandwidths.measured(server.peer_id)
        if cap_mbps is not None:
            # The prompt's transfer, told apart from the round trip and the server's compute.
            assert cap_mbps * 0.5 < measured < cap_mbps * 2
        else:
            assert measured == 0.0 or measured > 4 * CAP_MBPS  # too quick to tell, or plainly fast
        with model.inference_session(batch=BATCH, max_length=64) as session:
            assert _wires(session) == [later_wire]
            model.node.call(session.step, hidden[:, :PROMPT_TOKENS])
            out = model.node.call(session.step, hidden[:, PROMPT_TOKENS:])  # a decode step, in that wire
        assert out.shape == (BATCH, 1, 64) and torch.isfinite(out).all()
