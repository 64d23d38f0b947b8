"""What a client does when a server fails it, for inference and training alike: ban the server,
route its blocks anew before a deadline, and hand the new route to the work that was cut short
(an inference session replays its history there; a training pass is simply sent again). A server
that fails during that hand-over is banned in turn and the blocks are routed again, until the
deadline; then NoRouteError names the blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from petald.p2pnode.routing.bans import ServerBans
from petald.p2pnode.routing.route import (
    NoRouteError,
    SessionTooLarge,
    SpanHop,
    SpanRoute,
    SwarmFull,
)
from petald.p2pnode.transport.framed_stream import PeerGone
from petald.p2pnode.transport.peer_streams import ServerUnavailable
from petald.protocol.errors import ErrorCode, ProtocolError, RemoteError

log = logging.getLogger(__name__)

# What a failing server can throw at us. Anything else is a bug here, not a server to ban.
SERVER_FAILURES = (ServerUnavailable, RemoteError, ProtocolError, PeerGone)



def never_succeeds(failure: BaseException) -> bool:
    """A refusal no retry can turn: the request is over the server's own fixed limits (a session
    longer than it admits, more KV cache than it has in all), or this client is not on a private
    swarm's member list. Raised to the caller as it is; routes already avoid servers whose announced
    limits are too small, so another server would refuse too (and every member server refuses a
    non-member)."""
    return isinstance(failure, RemoteError) and failure.code in (ErrorCode.TOO_LARGE, ErrorCode.NOT_MEMBER)


# ``find_route(start, end, deadline)``: a route over blocks [start, end) that avoids banned
# servers, looking again (the swarm changes) until trio time ``deadline``, then NoRouteError.
RouteFinder = Callable[[int, int, float], Awaitable[SpanRoute]]


@dataclass
class Recovery:
    """One server replaced (for logs and the chaos benchmark)."""

    peer_id: str
    start: int
    end: int
    reason: str
    seconds: float  # from noticing the failure to the replacement taking over
    routing_seconds: float  # of which finding a replacement (waiting for one, when none is known)
    replayed_tokens: int  # an inference session's history sent to the replacement (training: 0)


class HopFailed(Exception):
    """The server of ``hop`` failed with ``failure`` (one of SERVER_FAILURES)."""

    def __init__(self, hop: SpanHop, failure: BaseException):
        super().__init__(str(failure))
        self.hop, self.failure = hop, failure


class Failover:
    def __init__(self, bans: ServerBans, recovery_timeout: float, recoveries: list[Recovery],
                 work: str = ""):
        """Every server replaced is recorded in ``recoveries``; ``work`` names what the server
        failed in the log ("a training pass"; "": its blocks)."""
        self.bans, self.recovery_timeout = bans, recovery_timeout
        self.recoveries = recoveries
        self.work = f"{work} " if work else ""  # "failed a training pass on blocks ..." / "failed on blocks ..."

    def deadline(self) -> float:
        """The trio time by which a recovery starting now must have found a server."""
        return trio.current_time() + self.recovery_timeout

    async def reroute(self, failed: HopFailed, start: int, end: int, deadline: float, find_route: RouteFinder,
                      take_over: Callable[[SpanRoute], Awaitable[None]] | None = None,
                      replayed_tokens: int = 0, noticed: float | None = None) -> SpanRoute:
        """Ban ``failed.hop``'s server, route blocks [start, end) (its blocks, or the rest of the work
        they were part of) anew and call ``take_over(route)``; when that raises HopFailed, ban that
        server too and route again. Returns the route that took over; raises NoRouteError (naming
        the blocks) when nothing holds them by ``deadline``."""
        noticed = trio.current_time() if noticed is None else noticed  # trio time the failure was seen
        culprit, failure = failed.hop, failed.failure
        routing = 0.0
        while True:
            peer = culprit.server.peer_id
            ban = self.bans.ban(peer)
            log.warning("server ..%s failed %son blocks %d:%d (%s); banned for %.0f s, re-routing",
                        peer[-8:], self.work, culprit.start, culprit.end, failure, ban)
            if trio.current_time() > deadline:
                raise NoRouteError(f"blocks {start}:{end}: every server tried failed within "
                                   f"{self.recovery_timeout:.0f} s; the last: {failure}", [(start, end)])
            began = trio.current_time()
            try:
                route = await find_route(start, end, deadline)
            except SessionTooLarge:
                raise
            except NoRouteError as exc:
                # Refused for room, the blocks are not unreachable: they are full (SwarmFull).
                full = isinstance(failure, RemoteError) and failure.code == ErrorCode.CACHE_FULL
                kind = SwarmFull if full else type(exc)
                raise kind(f"{exc} (the last server failed with: {failure})", exc.uncovered) from None
            routing += trio.current_time() - began
            if take_over is not None:
                try:
                    await take_over(route)
                except HopFailed as again:
                    if never_succeeds(again.failure):
                        raise again.failure from None
                    culprit, failure = again.hop, again.failure
                    continue
            self.recoveries.append(Recovery(failed.hop.server.peer_id, failed.hop.start, failed.hop.end, str(failure),
                                            trio.current_time() - noticed, routing, replayed_tokens))
            return route
