"""A request no server can ever take is named at once, from what the servers say of their limits
(routing's part, pure); the rest of it, against a real server, is in test_bad_input.py."""

from __future__ import annotations

import pytest

from petald.p2pnode.client.failover import never_succeeds
from petald.p2pnode.routing.route import NoRouteError, RemoteServer, SpanRoute, never_admitted
from petald.protocol.errors import RemoteError
from petald.protocol.messages import ServerInfo


def server(peer: str, start: int, end: int, max_length: int = 2048, free: int = 100_000,
           capacity: int = 100_000) -> RemoteServer:
    info = ServerInfo(model_id="m@1", fingerprint="f1", num_blocks=30, start=start, end=end, dtype="float32",
                      hidden_size=64, max_length=max_length, free_cache_tokens=free, version="test",
                      cache_capacity_tokens=capacity)
    return RemoteServer(peer, f"/ip4/127.0.0.1/tcp/1/p2p/{peer}", info)


def test_routes_skip_servers_that_admit_shorter_sessions():
    short, long = server("short", 0, 30, max_length=512), server("long", 0, 30, max_length=4096)
    assert [h.server.peer_id for h in SpanRoute.plan([short, long], 0, 30, max_length=1000).hops] == ["long"]
    with pytest.raises(NoRouteError) as err:
        SpanRoute.plan([short], 0, 30, max_length=1000)
    assert err.value.uncovered == [(0, 30)]


def test_a_session_longer_than_any_holder_admits_is_never_admitted():
    servers = [server("a", 0, 15, max_length=512), server("b", 15, 30, max_length=8192)]
    reason = never_admitted(servers, [(0, 15)], 1000, 1000)
    assert reason == ("a session of 1000 tokens is longer than any server of block 0 admits (at most 512): "
                      "ask for fewer tokens")


def test_a_session_over_every_holders_whole_kv_budget_is_never_admitted():
    # 15 blocks x 100 tokens = 1500 > 480 in all: full or not, it never fits there.
    servers = [server("a", 0, 15, free=0, capacity=480), server("b", 15, 30)]
    reason = never_admitted(servers, [(0, 15)], 100, 100)
    assert "needs 100 KV-cache tokens per block; no server of block 0 has that much in all" in reason
    assert "the largest budget: 480 tokens" in reason and "--cache-tokens" in reason


@pytest.mark.parametrize("servers", [
    [],  # nobody holds the blocks (yet): one may join, so the client waits
    [server("full", 0, 30, free=0)],  # full now, but the session fits once pages are freed
    [server("small", 0, 30, capacity=480), server("big", 0, 30, free=0)],  # one holder could take it
    [server("old", 0, 30, capacity=0)],  # a server that does not say its budget: assumed able
])
def test_blocks_a_server_could_take_later_are_waited_for(servers):
    assert never_admitted(servers, [(0, 30)], 100, 100) == ""


def test_only_a_too_large_refusal_is_final():
    assert never_succeeds(RemoteError("..peer", "too_large", "max_length 600 exceeds this server's 500"))
    assert not never_succeeds(RemoteError("..peer", "cache_full", "KV cache full"))
    assert not never_succeeds(RemoteError("..peer", "shutting_down", "leaving"))
