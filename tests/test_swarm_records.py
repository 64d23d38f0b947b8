"""Signed announcements, block placement and latency routing: the swarm's logic without processes."""

from __future__ import annotations

import logging
import time

import pytest

from petald.p2pnode.routing.bans import ServerBans
from petald.p2pnode.routing.placement import better_start, block_coverage, choose_start
from petald.p2pnode.routing.route import NoRouteError, RemoteServer, SpanRoute, uncovered_blocks
from petald.p2pnode.swarm.dht import (
    AnnouncementValidator,
    InvalidAnnouncement,
    record_key,
    sign_announcement,
    verify_announcement,
)
from petald.p2pnode.swarm.dropped_records import DroppedRecords
from petald.p2pnode.swarm.presence import record_lifetime
from petald.p2pnode.transport.identity import load_or_create_identity
from petald.protocol.announcement import ServerAnnouncement, SignedAnnouncement
from petald.protocol.limits import MAX_RECORD_LIFETIME_S
from petald.protocol.messages import ServerInfo


def make_record(peer_id: str = "peer", start: int = 0, end: int = 6, *, state: str = "online",
                rps: float = 100.0, issued: float | None = None, ttl: float = 60.0, num_blocks: int = 30,
                model_id: str = "m@1", fingerprint: str = "f1") -> ServerAnnouncement:
    now = time.time() if issued is None else issued
    return ServerAnnouncement(
        peer_id=peer_id, addresses=[f"/ip4/127.0.0.1/tcp/1/p2p/{peer_id}"], state=state, model_id=model_id,
        fingerprint=fingerprint, num_blocks=num_blocks, start=start, end=end, dtype="float32", quant="none",
        max_length=2048, free_cache_tokens=10_000, inference_rps=rps, forward_tps=10 * rps, network_mbps=0.0,
        issued_at=now, expires_at=now + ttl, version="test")


@pytest.fixture(scope="module")
def keys():
    return load_or_create_identity(None), load_or_create_identity(None)


def peer_of(key_pair) -> str:
    from libp2p.peer.id import ID

    return ID.from_pubkey(key_pair.public_key).to_base58()


def test_a_signed_record_verifies_and_round_trips(keys):
    record = make_record(peer_of(keys[0]))
    data = sign_announcement(record, keys[0]).to_bytes()
    assert verify_announcement(data, expected_peer=record.peer_id) == record


def test_forged_records_are_refused(keys):
    mine, other = keys
    victim = peer_of(mine)
    # Signed by another key while claiming to be the victim.
    with pytest.raises(InvalidAnnouncement, match="signed by"):
        verify_announcement(sign_announcement(make_record(victim), other).to_bytes())
    # A genuine record stored under somebody else's key.
    genuine = sign_announcement(make_record(peer_of(other)), other).to_bytes()
    with pytest.raises(InvalidAnnouncement, match="stored under"):
        verify_announcement(genuine, expected_peer=victim)
    # Payload changed after signing.
    signed = sign_announcement(make_record(victim, 0, 6), mine)
    tampered = SignedAnnouncement(make_record(victim, 0, 30).to_bytes(), signed.public_key, signed.signature)
    with pytest.raises(InvalidAnnouncement, match="bad signature"):
        verify_announcement(tampered.to_bytes())
    with pytest.raises(InvalidAnnouncement, match="malformed"):
        verify_announcement(b"\x00garbage")
    with pytest.raises(InvalidAnnouncement, match="malformed"):
        verify_announcement(SignedAnnouncement(signed.payload, b"not a key", signed.signature).to_bytes())


def test_expired_and_future_records_are_refused(keys):
    peer = peer_of(keys[0])
    expired = sign_announcement(make_record(peer, issued=time.time() - 120, ttl=60), keys[0]).to_bytes()
    with pytest.raises(InvalidAnnouncement, match="expired"):
        verify_announcement(expired)
    future = sign_announcement(make_record(peer, issued=time.time() + 3600), keys[0]).to_bytes()
    with pytest.raises(InvalidAnnouncement, match="future"):
        verify_announcement(future)


def test_a_record_that_never_expires_is_refused(keys):
    """Issue 22, hole 2: a validly signed record with expiry 1e12 was stored and served by every node."""
    peer = peer_of(keys[0])
    for ttl in (1e12 - time.time(), MAX_RECORD_LIFETIME_S + 1):
        forever = sign_announcement(make_record(peer, ttl=ttl), keys[0]).to_bytes()
        with pytest.raises(InvalidAnnouncement, match=f"at most {MAX_RECORD_LIFETIME_S:.0f} s"):
            AnnouncementValidator().validate(record_key(peer), forever)  # what a DHT node runs on store
    longest = sign_announcement(make_record(peer, ttl=MAX_RECORD_LIFETIME_S), keys[0]).to_bytes()
    assert verify_announcement(longest, expected_peer=peer).peer_id == peer
    # A server's own records live a few announce periods, within the bound for every period it accepts.
    assert record_lifetime(30.0) == 120.0 and record_lifetime(0.5) == 30.0
    assert record_lifetime(MAX_RECORD_LIFETIME_S / 2) == MAX_RECORD_LIFETIME_S


def test_validator_keeps_the_newest_record(keys):
    peer = peer_of(keys[0])
    validator = AnnouncementValidator()
    old = sign_announcement(make_record(peer, issued=time.time() - 10), keys[0]).to_bytes()
    new = sign_announcement(make_record(peer, 6, 12), keys[0]).to_bytes()
    validator.validate(record_key(peer), old)
    assert validator.select(record_key(peer), [old, new]) == 1
    assert validator.select(record_key(peer), [new, old]) == 0
    with pytest.raises(InvalidAnnouncement):
        validator.validate(record_key(peer_of(keys[1])), old)


def test_record_fields_are_bounded():
    from petald.protocol.errors import ProtocolError

    wire = make_record().to_wire()
    for field, value in [("start", 40), ("state", "lying"), ("inference_rps", float("nan")),
                         ("addresses", ["x"] * 100), ("quant", "int3")]:
        with pytest.raises(ProtocolError):
            ServerAnnouncement.from_wire({**wire, field: value})
    with pytest.raises(ProtocolError, match="exceeds"):
        SignedAnnouncement.from_bytes(b"\x00" * 20_000)


# --- placement -----------------------------------------------------------------------------------

def test_a_new_server_goes_where_the_swarm_is_weakest():
    records = [make_record("a", 0, 10, rps=100), make_record("b", 10, 20, rps=100), make_record("c", 8, 30, rps=50)]
    coverage = block_coverage(records, 30)
    assert coverage[0] == 100 and coverage[9] == 150 and coverage[25] == 50
    assert choose_start(coverage, 10) == 20  # blocks 20:30 only have the slow server
    assert choose_start([0.0] * 30, 8) == 0
    # Offline servers and other models' records do not count.
    assert block_coverage([make_record("x", 0, 30, state="offline")], 30) == [0.0] * 30


def test_a_server_moves_to_cover_an_uncovered_block_but_never_uncovers_one():
    twin_a, twin_b = make_record("a", 0, 8), make_record("b", 0, 8)
    rest = [make_record("c", 16, 24), make_record("d", 22, 30)]
    # Blocks 8:16 are uncovered: one of the twins moves there.
    assert better_start([twin_a, twin_b, *rest], twin_a, 100.0) == 8
    # The sole holder of 0:8 stays, even though 8:16 is uncovered.
    assert better_start([twin_a, *rest], twin_a, 100.0) is None


def test_hysteresis_keeps_a_balanced_swarm_still():
    records = [make_record("a", 0, 15, rps=100), make_record("b", 15, 30, rps=100),
               make_record("c", 0, 15, rps=100), make_record("d", 15, 30, rps=95)]
    # Moving c to 15:30 would raise the weakest block from 195 to 200 at best: not worth a reload.
    assert better_start(records, records[2], 100.0) is None
    lopsided = [make_record("a", 0, 15, rps=100), make_record("b", 15, 30, rps=100),
                make_record("c", 0, 15, rps=100), make_record("e", 0, 15, rps=100)]
    assert better_start(lopsided, lopsided[3], 100.0) == 15


# --- routing -------------------------------------------------------------------------------------

def server(peer: str, start: int, end: int, rtt: float = 0.0, rps: float = 0.0, free: int = 100_000) -> RemoteServer:
    info = ServerInfo(model_id="m@1", fingerprint="f1", num_blocks=30, start=start, end=end, dtype="float32",
                      hidden_size=64, max_length=2048, free_cache_tokens=free, version="test")
    return RemoteServer(peer, f"/ip4/127.0.0.1/tcp/1/p2p/{peer}", info, rtt, rps)


def test_route_prefers_the_lower_latency_chain():
    slow_far = server("far", 0, 30, rtt=0.200, rps=1000)
    near = [server("n1", 0, 15, rtt=0.002, rps=1000), server("n2", 15, 30, rtt=0.002, rps=1000)]
    route = SpanRoute.plan([slow_far, *near], 0, 30)
    assert [h.server.peer_id for h in route.hops] == ["n1", "n2"]
    fast_one = server("one", 0, 30, rtt=0.002, rps=1000)
    assert [h.server.peer_id for h in SpanRoute.plan([fast_one, *near], 0, 30).hops] == ["one"]
    # A slow GPU-less server loses to a faster one even with a longer round trip.
    sluggish = server("sluggish", 0, 30, rtt=0.001, rps=50)
    assert [h.server.peer_id for h in SpanRoute.plan([sluggish, slow_far], 0, 30).hops] == ["far"]


def test_route_respects_free_cache_and_cuts():
    full = server("full", 0, 30, free=100)
    roomy = [server("r1", 0, 15), server("r2", 15, 30)]
    route = SpanRoute.plan([full, *roomy], 0, 30, cache_tokens_per_block=1000)
    assert [h.server.peer_id for h in route.hops] == ["r1", "r2"]
    cut = SpanRoute.plan([full], 0, 30, frozenset({9, 19}))
    assert [(h.start, h.end) for h in cut.hops] == [(0, 10), (10, 20), (20, 30)]
    with pytest.raises(NoRouteError, match="blocks 15:30"):
        SpanRoute.plan([server("half", 0, 15)], 0, 30)


def test_no_route_names_every_uncovered_run_of_blocks():
    servers = [server("a", 0, 10), server("b", 12, 20), server("full", 25, 30, free=10)]
    assert uncovered_blocks(servers, 0, 30) == [(10, 12), (20, 25)]
    assert uncovered_blocks(servers, 0, 30, cache_tokens_per_block=100) == [(10, 12), (20, 30)]
    with pytest.raises(NoRouteError, match="blocks 10:12, 20:30") as error:
        SpanRoute.plan(servers, 0, 30, cache_tokens_per_block=100)
    assert error.value.uncovered == [(10, 12), (20, 30)]


def test_bans_grow_with_repeated_failures_and_end_on_success():
    now = [0.0]
    bans = ServerBans(first_ban=10, max_ban=35, clock=lambda: now[0])
    assert [bans.ban("p") for _ in range(4)] == [10, 20, 35, 35]
    assert bans.is_banned("p") and not bans.is_banned("q")
    now[0] = 34.9
    assert bans.is_banned("p")
    now[0] = 35.1
    assert not bans.is_banned("p")
    assert bans.has_failed("p") and bans.ban("p") == 35  # its failures are remembered after the ban ...
    bans.forgive("p")  # ... until it answers correctly
    assert not bans.has_failed("p") and bans.ban("p") == 10


def test_a_py_libp2p_without_the_dht_internals_we_use_is_refused_at_start(monkeypatch):
    from libp2p.kad_dht.value_store import ValueStore

    from petald.p2pnode.swarm.kad_protocol import check_library

    check_library()
    monkeypatch.delattr(ValueStore, "_get_from_peer")
    with pytest.raises(RuntimeError, match="ValueStore._get_from_peer"):
        check_library()


def test_a_dropped_record_is_logged_once(keys, caplog):
    expired = sign_announcement(make_record(peer_of(keys[0]), issued=time.time() - 120, ttl=60), keys[0]).to_bytes()
    other = sign_announcement(make_record(peer_of(keys[1]), issued=time.time() - 120, ttl=60), keys[1]).to_bytes()
    dropped = DroppedRecords()
    with caplog.at_level(logging.INFO, logger="petald.p2pnode.swarm.dht"):
        for value in (expired, expired, other, expired):
            try:
                verify_announcement(value)
            except InvalidAnnouncement as exc:
                dropped.drop(value, exc)
    told = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(told) == 2 and all(m.startswith("dropping a record: record of") and "expired" in m for m in told)


def test_in_a_large_swarm_a_server_moves_to_mend_a_weak_spot_and_a_balanced_one_stays_still():
    # 200 servers of 10 blocks on 40: blocks 10:20 lost half their servers at once.
    records = [make_record(f"s{i}", 10 * (i % 4), 10 * (i % 4) + 10, rps=100, num_blocks=40)
               for i in range(200) if not (i % 4 == 1 and i % 8 == 1)]
    mover = records[0]  # at 0:10, which keeps 50 servers
    assert better_start(records, mover, 100.0) == 10
    balanced = [make_record(f"s{i}", 10 * (i % 4), 10 * (i % 4) + 10, rps=100, num_blocks=40) for i in range(200)]
    assert all(better_start(balanced, r, 100.0) is None for r in balanced[:8])
