"""The DHT itself, in one process: three server nodes and a client on real libp2p hosts (127.0.0.1)."""

from __future__ import annotations

import socket
import time

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from petald.p2pnode.swarm import dht as dht_module
from petald.p2pnode.swarm.dht import (
    SERVERS_KEY,
    SwarmDHT,
    block_key,
    model_key,
    record_key,
    sign_announcement,
)
from petald.p2pnode.swarm.kad_protocol import LIBRARY_KAD_PROTOCOL, PETALD_KAD_PROTOCOL
from petald.p2pnode.swarm.swarm_map import read_swarm
from petald.p2pnode.transport.host import full_addresses, running_host
from petald.p2pnode.transport.identity import load_or_create_identity
from petald.protocol.announcement import ServerAnnouncement


def announcement(dht: SwarmDHT, model_id: str, start: int, end: int, *, ttl: float = 60.0,
                 issued: float | None = None, peer_id: str | None = None) -> ServerAnnouncement:
    now = time.time() if issued is None else issued
    return ServerAnnouncement(
        peer_id=peer_id or dht.peer_id, addresses=full_addresses(dht.host), state="online", model_id=model_id,
        fingerprint=model_id.split("@")[1], num_blocks=6, start=start, end=end, dtype="float32", quant="none",
        max_length=512, free_cache_tokens=1000, inference_rps=100.0, forward_tps=1000.0, network_mbps=0.0,
        issued_at=now, expires_at=now + ttl, version="test")


async def with_swarm(test) -> None:
    """Run ``test(servers, client)`` with three DHT server nodes and one client node."""
    keys = [load_or_create_identity(None) for _ in range(4)]
    async with running_host(keys[0]) as h0, running_host(keys[1]) as h1, running_host(keys[2]) as h2, \
            running_host(keys[3]) as hc:
        servers = [SwarmDHT(h, k, server_mode=True) for h, k in zip([h0, h1, h2], keys, strict=False)]
        client = SwarmDHT(hc, keys[3], server_mode=False)
        async with servers[0].running(), servers[1].running(), servers[2].running(), client.running():
            with trio.fail_after(60):
                bootstrap = full_addresses(h0)
                for node in (servers[1], servers[2], client):
                    assert await node.join(bootstrap) == 1
                await test(servers, client)


def test_a_client_finds_every_block_without_knowing_the_servers():
    async def test(servers, client):
        spans = [("m@aaa", 0, 3), ("m@aaa", 3, 6), ("other@bbb", 0, 6)]
        for dht, (model, start, end) in zip(servers, spans, strict=True):
            keys = [block_key(model, b) for b in range(start, end)] + [SERVERS_KEY]
            await dht.publish(announcement(dht, model, start, end), keys)
        found = await client.announcements([block_key("m@aaa", b) for b in range(6)])
        assert sorted((r.start, r.end) for r in found) == [(0, 3), (3, 6)]
        assert {r.model_id for r in found} == {"m@aaa"}  # two models in one swarm never mix
        only_block_4 = await client.announcements([block_key("m@aaa", 4)])
        assert [(r.start, r.end) for r in only_block_4] == [(3, 6)]
        models = {m.model_id: m for m in await read_swarm(client)}
        assert set(models) == {"m@aaa", "other@bbb"}
        assert models["m@aaa"].uncovered == [] and len(models["other@bbb"].servers) == 1

    trio.run(with_swarm, test)


def test_one_lookup_of_the_model_key_finds_its_servers_and_uncovered_blocks_are_looked_up_one_by_one():
    async def test(servers, client):
        new, old, other = servers
        await new.publish(announcement(new, "m@aaa", 0, 3),
                          [block_key("m@aaa", b) for b in range(3)] + [model_key("m@aaa")])
        await other.publish(announcement(other, "other@bbb", 0, 6), [model_key("other@bbb")])
        asked: list[bytes] = []
        providers_of = client.providers_of

        async def spy(key: bytes):
            asked.append(key)
            return await providers_of(key)

        client.providers_of = spy
        # Blocks 3:6 have no server yet: the model key covers 0:3, the rest are asked for one by one.
        found = await client.model_announcements("m@aaa", 6)
        assert [(r.start, r.end) for r in found] == [(0, 3)]
        assert asked[0] == model_key("m@aaa")
        assert sorted(asked[1:]) == sorted(block_key("m@aaa", b) for b in range(3, 6))
        # A server that provides its blocks but not the model key (an older petald) is found through them.
        await old.publish(announcement(old, "m@aaa", 3, 6), [block_key("m@aaa", b) for b in range(3, 6)])
        found = await client.model_announcements("m@aaa", 6)
        assert sorted((r.start, r.end) for r in found) == [(0, 3), (3, 6)]
        # Once the model key covers every block, one lookup is all it takes.
        await old.publish(announcement(old, "m@aaa", 3, 6), [model_key("m@aaa")])
        asked.clear()
        found = await client.model_announcements("m@aaa", 6)
        assert sorted((r.start, r.end) for r in found) == [(0, 3), (3, 6)] and asked == [model_key("m@aaa")]

    trio.run(with_swarm, test)


def test_forged_and_expired_records_are_dropped_by_every_node():
    async def test(servers, client):
        victim, attacker, _ = servers
        await victim.publish(announcement(victim, "m@aaa", 0, 6), [block_key("m@aaa", 0)])
        # The attacker signs a record that claims the victim's peer ID and pushes it straight
        # to the other nodes, past its own validator.
        forged = announcement(victim, "m@aaa", 0, 1, issued=time.time() + 5)
        value = sign_announcement(forged, attacker.key_pair).to_bytes()
        key = record_key(victim.peer_id).encode()
        for target in (victim, servers[2]):
            await attacker.kad.value_store._store_at_peer(target.host.get_id(), key, value)
        record = await client.announcement_of(victim.host.get_id())
        assert record is not None and (record.start, record.end) == (0, 6)
        for node in servers:
            stored = node.kad.value_store.get(key)
            assert stored is None or stored.value != value
        # An expired record (genuinely signed) is refused on arrival and never returned.
        stale = announcement(attacker, "m@aaa", 2, 4, issued=time.time() - 120, ttl=60)
        stale_value = sign_announcement(stale, attacker.key_pair).to_bytes()
        stale_key = record_key(attacker.peer_id).encode()
        await attacker.kad.value_store._store_at_peer(servers[2].host.get_id(), stale_key, stale_value)
        assert servers[2].kad.value_store.get(stale_key) is None
        assert await client.announcement_of(attacker.host.get_id()) is None
        # A record that never expires (issue 22, hole 2), genuinely signed: refused on store by every
        # node, and ignored on read even from the node that holds it past its own validator.
        forever = announcement(attacker, "m@aaa", 2, 4, ttl=1e12 - time.time())
        forever_value = sign_announcement(forever, attacker.key_pair).to_bytes()
        await attacker.kad.value_store._store_at_peer(servers[2].host.get_id(), stale_key, forever_value)
        assert servers[2].kad.value_store.get(stale_key) is None
        attacker.kad.value_store.put(stale_key, forever_value)  # the attacker answers for its own record
        assert attacker.kad.value_store.get(stale_key).value == forever_value
        assert await client.announcement_of(attacker.host.get_id()) is None

    trio.run(with_swarm, test)


def test_the_dht_speaks_petalds_protocol_not_ipfs():
    async def test(servers, client):
        for dht in servers:
            handlers = dht.host.get_mux().handlers
            assert PETALD_KAD_PROTOCOL in handlers and LIBRARY_KAD_PROTOCOL not in handlers
        assert PETALD_KAD_PROTOCOL not in client.host.get_mux().handlers  # a client stores nothing

    trio.run(with_swarm, test)


def test_a_lookup_held_up_by_a_peer_that_does_not_answer_still_finds_the_providers(monkeypatch):
    """A peer in the routing table whose address takes the TCP connection but never answers (a
    NATed server's LAN address seen from elsewhere stalls the same way): the library's network
    lookup waits its whole query timeout on it, longer than a lookup may take; the providers are
    still found from the peers this node knew."""
    monkeypatch.setattr(dht_module, "LOOKUP_TIMEOUT_S", 2.0)

    async def test(servers, client):
        await servers[0].publish(announcement(servers[0], "m@aaa", 0, 6), [model_key("m@aaa")])
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)  # connections complete in the backlog; nothing ever reads them
            stalled = ID.from_pubkey(load_or_create_identity(None).public_key)
            address = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{silent.getsockname()[1]}")
            client.host.get_peerstore().add_addrs(stalled, [address], 600)
            assert await client.kad.routing_table.add_peer(PeerInfo(stalled, [address]),
                                                           skip_server_mode_check=True)
            with trio.move_on_after(2.0) as lookup:  # the hold-up is real
                await client.kad.peer_routing.find_closest_peers_network(model_key("m@aaa"))
            assert lookup.cancelled_caught
            found = await client.providers_of(model_key("m@aaa"))
        assert servers[0].host.get_id() in {p.peer_id for p in found}

    trio.run(with_swarm, test)


def test_a_node_enters_others_routing_tables_only_once_it_answers_queries():
    """A server joins as a DHT client (it may turn out unreachable); switched to server mode, its
    identify push tells its peers, which add it at its next DHT contact."""
    async def test(servers, client):
        keys = load_or_create_identity(None)
        async with running_host(keys) as host:
            late = SwarmDHT(host, keys, server_mode=False)
            async with late.running():
                assert await late.join(full_addresses(servers[0].host)) == 1
                await late.providers_of(model_key("m@aaa"))  # a DHT contact while a client
                assert host.get_id() not in servers[0].kad.routing_table.get_peer_ids()
                await late.answer_queries(True)
                assert PETALD_KAD_PROTOCOL in host.get_mux().handlers
                while host.get_id() not in servers[0].kad.routing_table.get_peer_ids():
                    await late.providers_of(model_key("m@aaa"))
                    await trio.sleep(0.1)
                await late.answer_queries(False)
                assert PETALD_KAD_PROTOCOL not in host.get_mux().handlers

    trio.run(with_swarm, test)
