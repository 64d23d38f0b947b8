"""The client's passive measure of its link to each server (client/link_bandwidth.py): which steps
give a sample, how samples make an estimate, and how the estimate steers ``wire="auto"``."""

from __future__ import annotations

import pytest

from petald.p2pnode.client.link_bandwidth import (
    MAX_SERVERS,
    MIN_SAMPLE_BYTES,
    MIN_TRANSFER_RTTS,
    MIN_TRANSFER_S,
    SAMPLES_PER_SERVER,
    LinkBandwidths,
    bandwidth_sample,
)
from petald.p2pnode.client.wire_choice import session_wire
from petald.p2pnode.routing.route import RemoteServer
from petald.protocol.messages import ServerInfo

MB = 1_000_000


def _server(name: str, rtt: float = 0.02, mbps: float = 0.0) -> RemoteServer:
    info = ServerInfo("m", "f", 30, 0, 15, "float32", 576, 2048, 10**6, "0")
    return RemoteServer(name, f"/ip4/127.0.0.1/tcp/1/p2p/{name}", info, rtt=rtt, network_mbps=mbps)


def test_a_sample_is_the_bytes_over_what_is_left_after_the_round_trip_and_the_hold():
    # 1 MB both ways; 0.1 s round trip, 0.3 s held, 0.8 s of transfer: 10 Mbit/s.
    assert bandwidth_sample(MB, 1.2, 0.1, 0.3) == pytest.approx(10.0)


def test_steps_whose_transfer_cannot_be_told_give_no_sample():
    rtt = 0.05
    enough = MIN_TRANSFER_RTTS * rtt  # the least transfer time that counts at this round trip
    assert bandwidth_sample(MB, rtt + enough, rtt, 0.0) is not None
    assert bandwidth_sample(MB, rtt + enough * 0.99, rtt, 0.0) is None  # transfer too short a share
    assert bandwidth_sample(MIN_SAMPLE_BYTES - 1, 10.0, rtt, 0.0) is None  # a decode step, however slow
    assert bandwidth_sample(MIN_SAMPLE_BYTES, 10.0, rtt, 0.0) is not None
    tiny_rtt = 0.0001  # a local network: the absolute floor decides
    assert bandwidth_sample(MB, tiny_rtt + MIN_TRANSFER_S * 0.9, tiny_rtt, 0.0) is None
    assert bandwidth_sample(MB, tiny_rtt + MIN_TRANSFER_S * 1.1, tiny_rtt, 0.0) is not None
    assert bandwidth_sample(MB, 1.0, 0.0, 0.0) is None  # round trip unknown
    assert bandwidth_sample(MB, 1.0, rtt, None) is None  # the server did not say how long it held the step
    assert bandwidth_sample(MB, 1.0, rtt, 0.98) is None  # nearly all of it was the server's compute


def test_the_estimate_is_the_median_of_the_last_samples():
    links = LinkBandwidths()
    assert links.measured("a") == 0.0
    links.record("a", None)  # a step that gave no sample
    assert links.measured("a") == 0.0
    for mbps in (10.0, 11.0, 0.01, 9.0):  # one stalled reading
        links.record("a", mbps)
    assert links.measured("a") == pytest.approx(9.5)
    for _ in range(SAMPLES_PER_SERVER):  # the link slowed down: old samples age out
        links.record("a", 1.0)
    assert links.measured("a") == 1.0
    assert links.measured("b") == 0.0


def test_memory_stays_bounded_and_forgets_the_least_recently_measured_servers():
    links = LinkBandwidths()
    for i in range(MAX_SERVERS + 10):
        for _ in range(SAMPLES_PER_SERVER * 3):
            links.record(f"s{i}", float(i + 1))
        if i == MAX_SERVERS - 1:
            links.record("s0", 1.0)  # measured again, just before the first server is forgotten
    assert len(links) == MAX_SERVERS
    assert all(len(samples) == SAMPLES_PER_SERVER for samples in links._samples.values())
    assert links.measured("s0") == 1.0 and links.measured("s1") == 0.0
    assert links.measured(f"s{MAX_SERVERS + 9}") == MAX_SERVERS + 10


def test_auto_prefers_the_measured_rate_then_the_announced_one():
    links = LinkBandwidths()
    silent, announcing_slow = _server("a"), _server("b", mbps=0.5)
    assert session_wire("auto", silent, 1, links) == "float16"  # nothing known
    assert session_wire("auto", announcing_slow, 1, links) == "int8"  # 18 ms against 20 ms
    links.record("a", 0.5)
    links.record("b", 100.0)  # measured fast: the announcement is overruled
    assert session_wire("auto", silent, 1, links) == "int8"
    assert session_wire("auto", announcing_slow, 1, links) == "float16"
    assert session_wire("float32", silent, 1, links) == "float32"
