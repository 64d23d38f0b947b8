"""A server that others cannot dial serves through a relay, with real processes on 127.0.0.1.

The relayed server is forced private (``--reachability private``, the operators' override: on
127.0.0.1 every dial-back succeeds). Its relay is a relay-only node in this process (a real
libp2p host running ``RelayService``), named first among the server's initial peers, so the test
knows which relay it is. The wire is float32 (exact). (``RelayNode.drop`` is for the fault test
of a circuit dropped mid-session, which is not written yet: on 127.0.0.1 the client also ends up
with a direct connection to the relayed server, so a dropped circuit changes nothing there.)
"""

from __future__ import annotations

import pytest
import torch
from libp2p.tools.anyio_service import background_trio_service

from petald.cli.local_swarm import LocalSwarm
from petald.p2pnode.client.distributed_model import DistributedModel
from petald.p2pnode.client.node_thread import NodeThread
from petald.p2pnode.transport.host import full_addresses
from petald.p2pnode.transport.identity import load_or_create_identity
from petald.p2pnode.transport.relay_service import RelayService
from tests.oracle import reference_greedy

pytestmark = pytest.mark.slow

IDS = torch.randint(0, 320, (1, 8), generator=torch.Generator().manual_seed(5))
NEW_TOKENS = 16
SERVER_ARGS = ["--threads", "1", "--announce-period", "2", "--shutdown-grace", "1"]


class RelayNode:
    """A relay and nothing else, in this process."""

    def __init__(self) -> None:
        self.node = NodeThread(load_or_create_identity(None))
        self.service = RelayService(self.node.host, offer_hop=True)
        self._stop = None
        self.node.call(self._start)
        self.address = full_addresses(self.node.host)[0]

    async def _start(self) -> None:
        import trio

        started, self._stop = trio.Event(), trio.Event()

        async def run() -> None:
            async with background_trio_service(self.service):
                started.set()
                await self._stop.wait()

        trio.lowlevel.spawn_system_task(run)
        await started.wait()

    def drop(self, peer_suffix: str) -> None:
        """Close the relay's connection to a peer: its reservation and every circuit to it go."""
        async def drop() -> None:
            for peer in list(self.node.host.get_network().connections):
                if peer.to_base58().endswith(peer_suffix):
                    await self.node.host.get_network().close_peer(peer)
        self.node.call(drop)

    def stop(self) -> None:
        async def stop() -> None:
            self._stop.set()
        self.node.call(stop)
        self.node.stop()


def test_a_server_forced_private_serves_through_its_relay_with_the_oracles_tokens(tiny_models):
    path = str(tiny_models["llama"])
    relay = RelayNode()
    try:
        with LocalSwarm(["0:3"], model=path, extra_args=SERVER_ARGS) as swarm:
            swarm._launch(["3:6"], ["--initial-peers", relay.address, "--initial-peers", swarm.servers[0].address,
                                    "--reachability", "private"])
            home = swarm.servers[1]
            assert "/p2p-circuit/p2p/" in home.address and relay.address in home.address, home.output
            assert any("reachable through relay" in line for line in home.output)

            model = DistributedModel(model=path, initial_peers=[swarm.servers[0].address], wire_dtype="float32", push=False)
            try:
                route = model.route()
                relayed = [h for h in route.hops if "/p2p-circuit/" in h.server.address]
                assert [(h.start, h.end) for h in relayed] == [(3, 6)], route
                expected = reference_greedy(path, IDS, NEW_TOKENS)
                out = model.generate(IDS, max_new_tokens=NEW_TOKENS, eos_token_id=[])
                assert out[0, IDS.shape[1]:].tolist() == expected

            finally:
                model.close()
    finally:
        relay.stop()
