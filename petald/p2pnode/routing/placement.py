"""Where a server with ``--blocks auto`` places its span, and when it moves (Petals' rule).

Coverage is the summed per-block throughput of the servers holding each block. A new
server goes where the swarm is weakest: the window whose sorted coverage is
lexicographically smallest. A running server moves only if that covers a block that is
uncovered now, or raises the swarm's weakest block by more than the hysteresis; a move
that would uncover a block it alone holds is never taken.
"""

from __future__ import annotations

from collections.abc import Iterable

from petald.protocol.announcement import ServerAnnouncement

LIVE_STATES = ("joining", "online")


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
                 hysteresis: float = 0.25) -> int | None:
    """Where ``me`` should move to now, or None to stay."""
    length = me.end - me.start
    others = block_coverage(records, me.num_blocks, exclude_peer=me.peer_id)
    best = choose_start(others, length)
    if best == me.start:
        return None
    uncovered_now, weakest_now = _quality(_with_span(others, me.start, length, throughput))
    uncovered_then, weakest_then = _quality(_with_span(others, best, length, throughput))
    if uncovered_then != uncovered_now:
        return best if uncovered_then < uncovered_now else None
    return best if weakest_then > weakest_now * (1.0 + hysteresis) else None
