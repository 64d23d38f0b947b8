"""Where a server with ``--blocks auto`` places its span, and when it moves (Petals' rule).

Coverage is the summed per-block throughput of the servers holding each block. A new
server goes where the swarm is weakest: the window whose sorted coverage is
lexicographically smallest. A running server moves only if that covers a block that is
uncovered now, raises the swarm's weakest block by more than the hysteresis, or mends a weak
spot (a block below 0.8 of the mean) from blocks that stay stronger, by the hysteresis, than
those it joins will be; a move that would uncover a block it alone holds is never taken.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from petald.protocol.announcement import ServerAnnouncement

LIVE_STATES = ("joining", "online")
HYSTERESIS = 0.25  # a move must raise the weakest block by this share (unless it covers a gap)
WEAK_SPOT = 0.8  # of the mean block throughput: below it, servers from stronger blocks move in
MOVE_COOLDOWN_PERIODS = 3  # rebalance periods a server stays put after it moved
FIRST_CHECK_S = (2.0, 8.0)  # range of the random delay before a server's first rebalance check


def block_coverage(records: Iterable[ServerAnnouncement], num_blocks: int,
                   exclude_peer: str | None = None) -> list[float]:
    coverage = [0.0] * num_blocks
    for record in records:
        if record.state not in LIVE_STATES or record.peer_id == exclude_peer:
            continue
        # A server that has not measured yet still counts, a little, so that a joining
        # server's span is seen as covered rather than chosen again by the next one.
        weight = record.inference_rps if record.inference_rps > 0 else 1e-3
        for block in range(record.start, min(record.end, num_blocks)):
            coverage[block] += weight
    return coverage


def choose_start(coverage: list[float], length: int) -> int:
    """The start of the ``length``-block window where the swarm is weakest."""
    if not 0 < length <= len(coverage):
        raise ValueError(f"cannot place {length} blocks in a model of {len(coverage)}")
    return min(range(len(coverage) - length + 1), key=lambda s: (sorted(coverage[s:s + length]), s))


def _with_span(coverage: list[float], start: int, length: int, throughput: float) -> list[float]:
    out = list(coverage)
    for block in range(start, start + length):
        out[block] += throughput
    return out


def _quality(coverage: list[float]) -> tuple[int, float]:
    """Fewer uncovered blocks first, then a stronger weakest block."""
    return sum(1 for c in coverage if c <= 0), min(coverage)


def better_start(records: Iterable[ServerAnnouncement], me: ServerAnnouncement, throughput: float,
                 hysteresis: float = HYSTERESIS) -> int | None:
    """Where ``me`` should move to now, or None to stay."""
    others = block_coverage(records, me.num_blocks, exclude_peer=me.peer_id)
    return move_target(others, me.start, me.end - me.start, throughput, hysteresis)


def move_target(others: list[float], start: int, length: int, throughput: float,
                hysteresis: float = HYSTERESIS) -> int | None:
    """The start a server of ``length`` blocks at ``start`` should move to, given the coverage
    ``others`` of every other server, or None to stay (the decision alone: the swarm simulation
    calls it too)."""
    best = choose_start(others, length)
    if best == start:
        return None
    uncovered_now, weakest_now = _quality(_with_span(others, start, length, throughput))
    uncovered_then, weakest_then = _quality(_with_span(others, best, length, throughput))
    if uncovered_then != uncovered_now:
        return best if uncovered_then < uncovered_now else None
    if weakest_then > weakest_now * (1.0 + hysteresis):
        return best
    # In a large swarm one server is a small share of any block's throughput: no single move raises
    # the swarm's weakest block by the hysteresis, and a weak spot (the servers of some blocks gone at
    # once) was mended only by servers joining (benchmarks/swarm_simulation.py: 920 s to 0.8 of the
    # ideal at 1,000 servers). So where the weakest block is below WEAK_SPOT of the mean, a server
    # also moves when the blocks it leaves stay stronger, by the hysteresis, than the blocks it
    # joins will be. Such a move never makes a spot weaker than the one it mends, so nobody would
    # move back: every move raises the sorted coverage, and moves stop.
    weakest = min(others[best:best + length])
    if weakest >= WEAK_SPOT * sum(others) / len(others):
        return None  # no weak spot: small imbalances are not worth a reload
    left = min(others[b] for b in range(start, start + length) if not best <= b < best + length)
    return best if left >= (weakest + throughput) * (1.0 + hysteresis) else None


class RebalanceSchedule:
    """When a ``--blocks auto`` server looks at the swarm again, in seconds of its own clock.

    The first look comes soon (servers started together may have chosen the same span before they
    could see each other's records); later ones every ``period`` with jitter, so that servers do
    not all move at once; after a move the server stays put for a few periods, so that the swarm
    sees the move before it is judged.
    """

    def __init__(self, period: float, rng: random.Random | None = None):
        self.period = period
        self.rng = rng or random.Random()
        self.moved_at = float("-inf")

    def first_wait(self) -> float:
        return self.rng.uniform(FIRST_CHECK_S[0], min(FIRST_CHECK_S[1], self.period))

    def next_wait(self) -> float:
        return self.rng.uniform(0.5 * self.period, 1.5 * self.period)

    def may_move(self, now: float) -> bool:
        return now - self.moved_at >= MOVE_COOLDOWN_PERIODS * self.period

    def moved(self, now: float) -> None:
        self.moved_at = now
