"""What one peer may take of a server (``server/peer_limits.py``): counted at a session's open,
paced per step and training request. Trio's mock clock stands in for waiting; the ledger is real."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from petald.kernels.executor import DEFAULT_PREFILL_CHUNK
from petald.p2pnode.server.peer_limits import SWEEP_ABOVE, PeerLedger, PeerLimits
from petald.protocol.errors import ErrorCode, ProtocolError


def _run(fn) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def _refused(code: ErrorCode, fn, *args) -> str:
    with pytest.raises(ProtocolError) as caught:
        fn(*args)
    assert caught.value.code == code
    return caught.value.message


def test_sessions_and_cache_share_are_counted_per_peer():
    async def main() -> None:
        ledger = PeerLedger(PeerLimits(sessions=2, cache_share=0.5), num_pages=100)
        ledger.open_session("a", 30)
        assert "hold 30 of this server's 100 KV pages and this one needs 30; one peer may hold 50" in _refused(ErrorCode.QUOTA, ledger.open_session, "a", 30)
        ledger.open_session("a", 20)
        assert "2 sessions open" in _refused(ErrorCode.BUSY, ledger.open_session, "a", 1)
        assert "at most 50" in _refused(ErrorCode.TOO_LARGE, ledger.open_session, "b", 51)  # never, by itself
        ledger.open_session("b", 50)  # another peer has a share of its own
        ledger.close_session("a", 20)
        ledger.open_session("a", 20)

    _run(main)


def test_steps_and_bytes_are_paced_not_refused():
    async def main() -> None:
        ledger = PeerLedger(PeerLimits(steps_per_s=10, bytes_per_s=1000), num_pages=100)
        start = trio.current_time()
        for _ in range(10):  # a second's worth ahead
            await ledger.pace_step("a", 1, 0)
        assert trio.current_time() == start
        await ledger.pace_step("a", 1, 0)
        assert trio.current_time() - start == pytest.approx(0.1)
        await ledger.pace_step("b", 10 * DEFAULT_PREFILL_CHUNK, 0)  # a prefill counts per executor chunk
        await ledger.pace_step("b", 1, 0)
        assert trio.current_time() - start == pytest.approx(0.2)
        await ledger.pace_step("c", 1, 3000)  # 1000 bytes/s: 2 s owed past the burst
        assert trio.current_time() - start == pytest.approx(2.2)

    _run(main)


def test_a_training_request_past_its_rate_waits_or_is_refused_without_charge():
    async def main() -> None:
        ledger = PeerLedger(PeerLimits(training_tokens_per_s=100), num_pages=100)
        await ledger.pace_training("a", 100, 0, longest_wait=5)
        start = trio.current_time()
        await ledger.pace_training("a", 200, 0, longest_wait=5)
        assert trio.current_time() - start == pytest.approx(2.0)
        assert "100 training tokens per second" in str(
            await _refused_async(ledger.pace_training("a", 1000, 0, longest_wait=5)))
        assert trio.current_time() - start == pytest.approx(2.0)  # refused at once
        await ledger.pace_training("a", 100, 0, longest_wait=5)  # the refused one was not charged
        assert trio.current_time() - start == pytest.approx(3.0)

    _run(main)


async def _refused_async(awaitable) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        await awaitable
    assert caught.value.code == ErrorCode.QUOTA
    return caught.value


def test_idle_accounts_are_forgotten():
    async def main() -> None:
        ledger = PeerLedger(PeerLimits(), num_pages=100)
        ledger.open_session("a", 1)
        ledger.close_session("a", 1)
        assert not ledger._accounts  # nothing open, nothing owed
        for i in range(SWEEP_ABOVE + 1):
            await ledger.pace_step(f"peer{i}", 1, 0)
        await trio.sleep(2)  # every bucket full again
        ledger.open_session("last", 1)
        assert list(ledger._accounts) == ["last"]

    _run(main)
