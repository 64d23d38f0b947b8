"""Circuit relay v2 and dial-back between real libp2p hosts on 127.0.0.1, in one trio run each.

A relay (``RelayService`` with hop), a relayed peer (stop, holding a reservation) and callers:
bytes go through the relay over petald's own hosts (Noise and yamux over a relay stream), the
swarm dials relay addresses by itself, and what one peer may take from a relay is bounded.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from petald.p2pnode.transport.circuit_dialing import set_address_finder
from petald.p2pnode.transport.dialback import DialBackHelper, ask_dial_back
from petald.p2pnode.transport.direct_upgrade import client_listen
from petald.p2pnode.transport.framed_stream import FramedStream
from petald.p2pnode.transport.host import full_addresses, parse_peer_address, running_host
from petald.p2pnode.transport.peer_streams import ServerUnavailable
from petald.p2pnode.transport.relay_client import (
    CircuitAddress,
    RelayRefused,
    circuit_address,
    dial_circuit,
    reserve,
)
from petald.p2pnode.transport.relay_service import RelayService, RelayServiceLimits

ECHO = TProtocol("/petald-test/echo/1.0.0")


async def _echo(stream) -> None:
    framed = FramedStream(stream)
    while (msg := await framed.receive()) is not None:
        await framed.send({"type": "echo", "n": msg["n"]})


async def _round_trips(host, peer: ID, count: int) -> list[int]:
    framed = FramedStream(await host.new_stream(peer, [ECHO]))
    out = []
    for n in range(count):
        await framed.send({"type": "ping", "n": n, "pad": b"x" * 3000})
        out.append((await framed.receive())["n"])
    await framed.stream.close()
    return out


@contextlib.asynccontextmanager
async def _relay_and_relayed(limits: RelayServiceLimits | None = None) -> AsyncIterator[tuple]:
    """A relay, a peer reserved on it (answering ECHO) and its circuit address."""
    async with running_host(create_new_key_pair()) as relay, running_host(create_new_key_pair()) as relayed:
        service = RelayService(relay, offer_hop=True, limits=limits or RelayServiceLimits())
        async with background_trio_service(service), \
                background_trio_service(RelayService(relayed, offer_hop=False)):
            relayed.set_stream_handler(ECHO, _echo)
            relay.set_stream_handler(ECHO, _echo)
            relay_address = full_addresses(relay)[0]
            await relayed.connect(parse_peer_address(relay_address))
            await reserve(relayed, relay.get_id())
            yield relay, relayed, service, circuit_address(relay_address, relayed.get_id())


def test_frames_travel_through_a_relay_on_petalds_hosts():
    async def main():
        with trio.fail_after(30):
            async with _relay_and_relayed() as (relay, relayed, service, address), \
                    running_host(create_new_key_pair()) as caller:
                # Only the circuit address is known: the swarm's own dial goes through the relay.
                caller.get_peerstore().add_addrs(relayed.get_id(), [parse_peer_address(address).addrs[0]], 60)
                assert await _round_trips(caller, relayed.get_id(), 50) == list(range(50))
                conns = caller.get_network().get_connections(relayed.get_id())
                assert len(conns) == 1 and "/p2p-circuit" in str(conns[0].muxed_conn.secured_conn.conn
                                                                   .read_writer.read_write_closer.get_transport_addresses())
                assert service.stats()["circuits"] == 1

    trio.run(main)


def test_a_relay_refuses_a_destination_without_reservation_and_bad_addresses_say_why():
    async def main():
        with trio.fail_after(30):
            async with _relay_and_relayed() as (relay, relayed, service, address), \
                    running_host(create_new_key_pair()) as caller:
                stranger = create_new_key_pair().public_key
                unreserved = circuit_address(full_addresses(relay)[0], ID.from_pubkey(stranger))
                with pytest.raises(RelayRefused, match="NO_RESERVATION"):
                    await dial_circuit(caller, unreserved)

    trio.run(main)
    for bad in ["/ip4/1.2.3.4/tcp/1", "/p2p-circuit/p2p/x", "/ip4/1.2.3.4/tcp/1/p2p/nope/p2p-circuit/p2p/nope"]:
        with pytest.raises(ValueError):
            CircuitAddress.parse(bad)


async def _raw_hop(host, relay: ID, message: HopMessage) -> int:
    stream = await host.new_stream(relay, [HOP])
    await write_delimited_msg(stream, message)
    reply = await read_delimited_msg(stream, HopMessage)
    await stream.reset()
    return reply.status


def test_a_reservation_flood_with_made_up_peer_ids_takes_one_slot():
    """The library reserves for whatever peer ID a RESERVE names; here only for the sender."""
    limits = RelayServiceLimits(max_reservations=3, max_reservations_per_ip=10)

    async def main():
        with trio.fail_after(60):
            async with _relay_and_relayed(limits) as (relay, relayed, service, address), \
                    running_host(create_new_key_pair()) as flooder:
                await flooder.connect(parse_peer_address(full_addresses(relay)[0]))
                for _ in range(10):
                    fake = ID.from_pubkey(create_new_key_pair().public_key)
                    await _raw_hop(flooder, relay.get_id(), HopMessage(type=HopMessage.RESERVE,
                                                                        peer=CircuitPeerId(id=fake.to_bytes())))
                # The relayed peer and the flooder: two slots, whatever the flood named.
                assert service.stats()["reservations"] == 2
                async with running_host(create_new_key_pair()) as late:
                    await late.connect(parse_peer_address(full_addresses(relay)[0]))
                    await reserve(late, relay.get_id())  # a third real peer still finds a slot
                    async with running_host(create_new_key_pair()) as fourth:
                        await fourth.connect(parse_peer_address(full_addresses(relay)[0]))
                        with pytest.raises(RelayRefused, match="RESOURCE_LIMIT_EXCEEDED"):
                            await reserve(fourth, relay.get_id())
                assert service.stats()["refused"] == {"reservations": 1}

    trio.run(main)


def test_one_ip_address_holds_at_most_its_share_of_reservations():
    async def main():
        with trio.fail_after(60):
            async with _relay_and_relayed(RelayServiceLimits(max_reservations_per_ip=2)) as (relay, _, service, _a), \
                    running_host(create_new_key_pair()) as second, running_host(create_new_key_pair()) as third:
                for host in (second, third):
                    await host.connect(parse_peer_address(full_addresses(relay)[0]))
                await reserve(second, relay.get_id())
                with pytest.raises(RelayRefused, match="RESOURCE_LIMIT_EXCEEDED"):
                    await reserve(third, relay.get_id())  # all three are on 127.0.0.1
                assert service.stats()["refused"] == {"reservations per IP": 1}
                await second.disconnect(relay.get_id())  # a reservation lives as long as its connection
                await trio.sleep(0.2)
                await reserve(third, relay.get_id())

    trio.run(main)


def test_a_circuit_flood_from_one_peer_is_refused_and_the_relay_keeps_serving():
    limits = RelayServiceLimits(max_circuits_per_source=2)

    async def main():
        with trio.fail_after(60):
            async with _relay_and_relayed(limits) as (relay, relayed, service, address), \
                    running_host(create_new_key_pair()) as flooder, running_host(create_new_key_pair()) as user:
                await flooder.connect(parse_peer_address(full_addresses(relay)[0]))
                connect = HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=relayed.get_id().to_bytes()))
                opened, statuses = [], []
                for _ in range(6):  # circuits held open: each one's stream stays with the flooder
                    stream = await flooder.new_stream(relay.get_id(), [HOP])
                    await write_delimited_msg(stream, connect)
                    statuses.append((await read_delimited_msg(stream, HopMessage)).status)
                    opened.append(stream)
                assert statuses.count(100) == 2 and statuses.count(201) == 4  # OK, RESOURCE_LIMIT_EXCEEDED
                assert service.stats()["refused"] == {"circuits per source": 4}
                # The relay still serves its own peers, and others still get circuits.
                await user.connect(parse_peer_address(full_addresses(relay)[0]))
                assert await _round_trips(user, relay.get_id(), 5) == list(range(5))
                await dial_circuit(user, address)
                assert await _round_trips(user, relayed.get_id(), 5) == list(range(5))
                for stream in opened:
                    await stream.reset()

    trio.run(main)


def test_dial_back_reaches_a_listening_node_and_not_a_closed_port():
    async def main():
        with trio.fail_after(60):
            async with running_host(create_new_key_pair()) as helper, running_host(create_new_key_pair()) as node:
                DialBackHelper(helper).register()
                await node.connect(parse_peer_address(full_addresses(helper)[0]))
                reached = await ask_dial_back(node, helper.get_id().to_base58())
                port = full_addresses(node)[0].split("/tcp/")[1].split("/")[0]
                assert reached == [f"/ip4/127.0.0.1/tcp/{port}"]
                # A second request within the interval is refused: the helper is no dialling service.
                with pytest.raises(Exception, match="one dial-back per"):
                    await ask_dial_back(node, helper.get_id().to_base58())
                # A node whose listen port is closed is reached on nothing.
                async with running_host(create_new_key_pair()) as closed:
                    await closed.connect(parse_peer_address(full_addresses(helper)[0]))
                    for listener in closed.get_network().listeners.values():
                        await listener.close()
                    assert await ask_dial_back(closed, helper.get_id().to_base58()) == []

    trio.run(main)


@pytest.mark.parametrize("request_frame", [{"type": "dialback"}, {"type": "dialback", "ports": [0]},
                                           {"type": "dialback", "ports": list(range(1, 10))},
                                           {"type": "dialback", "ports": ["x"]}])
def test_bad_dial_back_requests_get_an_error_and_the_helper_keeps_serving(request_frame):
    async def main():
        with trio.fail_after(30):
            async with running_host(create_new_key_pair()) as helper, running_host(create_new_key_pair()) as node:
                DialBackHelper(helper).register()
                await node.connect(PeerInfo(helper.get_id(), [parse_peer_address(full_addresses(helper)[0]).addrs[0]]))
                framed = FramedStream(await node.new_stream(helper.get_id(), [TProtocol("/petald/dialback/1.0.0")]))
                await framed.send(request_frame)
                reply = await framed.receive()
                assert reply["type"] == "error" and reply["code"] == "bad_message"
                assert await ask_dial_back(node, helper.get_id().to_base58())  # and then serves a good one

    trio.run(main)


def test_asking_a_peer_without_dial_back_is_a_clear_failure():
    async def main():
        with trio.fail_after(30):
            async with running_host(create_new_key_pair()) as other, running_host(create_new_key_pair()) as node:
                await node.connect(parse_peer_address(full_addresses(other)[0]))
                with pytest.raises(ServerUnavailable, match="does not speak /petald/dialback"):
                    await ask_dial_back(node, other.get_id().to_base58())

    trio.run(main)


def test_a_peer_known_by_no_address_is_looked_up_and_reached_through_its_relay():
    """A server pushing to a relayed server it knows nothing of: the address finder (a server's
    DHT record lookup) gives the circuit address, and the dial goes through the relay."""
    async def main():
        with trio.fail_after(30):
            async with _relay_and_relayed() as (relay, relayed, service, address), \
                    running_host(create_new_key_pair()) as pusher:
                asked = []

                async def find(peer: ID) -> list[str]:
                    asked.append(peer)
                    return [address] if peer == relayed.get_id() else []

                set_address_finder(pusher, find)
                assert await _round_trips(pusher, relayed.get_id(), 3) == [0, 1, 2]
                assert asked == [relayed.get_id()] and service.stats()["circuits"] == 1

    trio.run(main)


def test_a_lookup_whose_own_dials_fail_starts_no_lookups_of_its_own():
    """The finder's DHT queries dial peers too; were each failed dial to look its peer up, lookups
    would nest without end (this once crashed a relayed server with a RecursionError)."""
    async def main():
        with trio.fail_after(30):
            async with running_host(create_new_key_pair()) as host:
                asked = []
                nobody = [ID.from_pubkey(create_new_key_pair().public_key) for _ in range(3)]

                async def find(peer: ID) -> list[str]:
                    asked.append(peer)
                    with contextlib.suppress(Exception):
                        await host.new_stream(nobody[len(asked) % 3], [ECHO])  # a DHT query to a dead peer
                    return []

                set_address_finder(host, find)
                with pytest.raises(SwarmException):
                    await host.new_stream(nobody[0], [ECHO])
                assert asked == [nobody[0]]

    trio.run(main)


def test_a_client_listens_on_every_interface_only_to_punch_beyond_loopback():
    beyond = ["/ip4/203.0.113.5/tcp/31330/p2p/12D3KooWLshnq6TvssFMhSmSWnA2BbJjLsUyW1PRy6dcDC61H1mw"]
    here = ["/ip4/127.0.0.1/tcp/31330/p2p/12D3KooWLshnq6TvssFMhSmSWnA2BbJjLsUyW1PRy6dcDC61H1mw"]
    assert client_listen(beyond, direct_upgrade=True) == ["/ip4/0.0.0.0/tcp/0"]
    assert client_listen(beyond, direct_upgrade=False) == ["/ip4/127.0.0.1/tcp/0"]
    assert client_listen(here, direct_upgrade=True) == ["/ip4/127.0.0.1/tcp/0"]
