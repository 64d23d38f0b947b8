"""The client's wire per hop under ``wire="auto"`` (client/wire_choice.py): the rule on figures a
client has (measured round trips, announced bandwidths), and explicit choices passed through."""

from __future__ import annotations

import pytest

from petald.p2pnode.client.wire_choice import (
    INT8_SHARE_OF_RTT,
    link_wire,
    push_wire,
    session_wire,
    training_wire,
)
from petald.p2pnode.routing.route import RemoteServer
from petald.protocol.messages import ServerInfo

HIDDEN = 576  # SmolLM2: a decode token is 1152 bytes at 16 bits


def _server(rtt: float, mbps: float, name: str = "a") -> RemoteServer:
    info = ServerInfo("m", "f", 30, 0, 15, "float32", HIDDEN, 2048, 10**6, "0")
    return RemoteServer(name, f"/ip4/127.0.0.1/tcp/1/p2p/{name}", info, rtt=rtt, network_mbps=mbps)


@pytest.mark.parametrize("rtt, mbps, expected", [
    (0.0, 100.0, "float16"),  # no measured round trip (a server given with --peers)
    (0.05, 0.0, "float16"),  # no announced bandwidth
    (0.05, 1000.0, "float16"),  # 9 us to send against a 50 ms round trip
    (0.02, 10.0, "float16"),  # 0.9 ms against 20 ms: under a fifth
    (0.02, 1.0, "int8"),  # 9.2 ms against 20 ms: halving saves a fifth of the hop
    (0.001, 20.0, "int8"),  # a fast round trip on a slow link
])
def test_auto_goes_int8_only_where_the_payload_is_a_large_share_of_the_round_trip(rtt, mbps, expected):
    assert session_wire("auto", _server(rtt, mbps), rows=1) == expected


def test_the_threshold_is_the_payload_time_against_the_round_trip():
    transfer = 1152 * 8 / 1e6  # seconds at 1 Mbit/s
    assert link_wire(1152, transfer / INT8_SHARE_OF_RTT, 1.0) == "int8"
    assert link_wire(1152, transfer / INT8_SHARE_OF_RTT * 1.01, 1.0) == "float16"
    # A batch multiplies the payload: 64 rows on a 100 Mbit/s link with a 20 ms round trip.
    assert session_wire("auto", _server(0.02, 100.0), rows=1) == "float16"
    assert session_wire("auto", _server(0.02, 100.0), rows=64) == "int8"


def test_a_push_hop_takes_the_slower_servers_bandwidth_and_needs_both():
    fast, slow, silent = _server(0.02, 1000.0, "f"), _server(0.02, 1.0, "s"), _server(0.02, 0.0, "q")
    assert push_wire("auto", fast, fast, 1) == "float16"
    assert push_wire("auto", fast, slow, 1) == push_wire("auto", slow, fast, 1) == "int8"
    assert push_wire("auto", slow, silent, 1) == "float16"  # one bandwidth unknown: the hop's is


@pytest.mark.parametrize("choice", ["float32", "bfloat16", "float16", "int8"])
def test_an_explicit_wire_is_used_on_every_hop(choice):
    slow, fast = _server(0.02, 1.0), _server(0.02, 1000.0)
    assert session_wire(choice, fast, 1) == session_wire(choice, slow, 1) == choice
    assert push_wire(choice, fast, slow, 1) == choice == training_wire(choice)
    assert training_wire("auto") == "float16"
