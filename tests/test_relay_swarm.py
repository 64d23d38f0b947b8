"""A server that others cannot dial serves through a relay, with real processes on 127.0.0.1; a
flood against the relay is refused by its limits while the relay keeps serving its own sessions.

The relayed server is forced private (``--reachability private``, the operators' override: on
127.0.0.1 every dial-back succeeds) and reserves on the swarm's first server, which also serves
blocks. (On 127.0.0.1 the client may reach the relayed server directly as well, since it is in
fact dialable: tests/test_relay_nat.py is where a client can only go through the relay.)
The wire is float32 (exact).
"""

from __future__ import annotations

import pytest
import torch
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from petald.cli.local_swarm import LocalSwarm
from petald.p2pnode.client.distributed_model import DistributedModel
from petald.p2pnode.client.node_thread import NodeThread
from petald.p2pnode.transport.host import parse_peer_address
from petald.p2pnode.transport.identity import load_or_create_identity
from petald.p2pnode.transport.relay_client import reserve
from petald.p2pnode.transport.relay_service import MAX_CIRCUITS_PER_SOURCE
from tests.oracle import reference_greedy

pytestmark = pytest.mark.slow

IDS = torch.randint(0, 320, (1, 8), generator=torch.Generator().manual_seed(5))
NEW_TOKENS = 16
SERVER_ARGS = ["--threads", "1", "--announce-period", "2", "--shutdown-grace", "1"]
OK, RESOURCE_LIMIT_EXCEEDED = 100, 201


async def _flood(host, relay_address: str, target: str, streams: list) -> tuple[list[int], list[int]]:
    """From one peer: RESERVEs naming made-up peer IDs, then CONNECTs to ``target`` held open."""
    relay = parse_peer_address(relay_address)
    await host.connect(relay)

    async def ask(message: HopMessage) -> int:
        stream = await host.new_stream(relay.peer_id, [HOP])
        await write_delimited_msg(stream, message)
        streams.append(stream)
        return (await read_delimited_msg(stream, HopMessage)).status

    fake = [ID.from_pubkey(load_or_create_identity(None).public_key) for _ in range(40)]
    reserves = [await ask(HopMessage(type=HopMessage.RESERVE, peer=CircuitPeerId(id=f.to_bytes()))) for f in fake]
    target_id = ID.from_base58(target.rsplit("/", 1)[1])
    connects = [await ask(HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=target_id.to_bytes())))
                for _ in range(3 * MAX_CIRCUITS_PER_SOURCE)]
    return reserves, connects


def test_a_relayed_server_serves_and_a_flood_leaves_the_relay_serving(tiny_models):
    path = str(tiny_models["llama"])
    expected = reference_greedy(path, IDS, NEW_TOKENS)
    with LocalSwarm(["0:3"], model=path, extra_args=SERVER_ARGS) as swarm:
        relay = swarm.servers[0]
        swarm.add("3:6", ["--reachability", "private"])
        home = swarm.servers[1]
        assert home.address.startswith(relay.address + "/p2p-circuit/p2p/"), home.output
        assert any("reachable through relay" in line for line in home.output), home.output

        flooder, streams = NodeThread(load_or_create_identity(None)), []
        try:
            reserves, connects = flooder.call(_flood, flooder.host, relay.address, home.address, streams)
            # Forty made-up peer IDs took one slot, the flooder's own: all answered OK as refreshes.
            assert reserves == [OK] * len(reserves)
            assert connects.count(OK) == MAX_CIRCUITS_PER_SOURCE
            assert connects.count(RESOURCE_LIMIT_EXCEEDED) == len(connects) - MAX_CIRCUITS_PER_SOURCE

            late = NodeThread(load_or_create_identity(None))  # a real newcomer still finds a slot
            try:
                async def reserve_on_relay() -> int:
                    await late.host.connect(parse_peer_address(relay.address))
                    return await reserve(late.host, parse_peer_address(relay.address).peer_id)
                assert late.call(reserve_on_relay) > 0
            finally:
                late.stop()

            # With the flood's circuits still open, the relay serves its own blocks and relays.
            model = DistributedModel(model=path, initial_peers=[relay.address], wire="float32")
            try:
                hops = {(h.start, h.end): h.server.address for h in model.route().hops}
                assert hops == {(0, 3): relay.address, (3, 6): home.address}
                assert model.generate(IDS, max_new_tokens=NEW_TOKENS, eos_token_id=[])[0, IDS.shape[1]:].tolist() \
                    == expected
            finally:
                model.close()
        finally:
            flooder.stop()
