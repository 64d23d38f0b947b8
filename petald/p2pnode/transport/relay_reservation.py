"""Holding a slot on a relay, for a node that others cannot dial.

``RelayReservation.keep`` reserves on the first candidate relay that accepts, publishes the
circuit address (``addresses``), refreshes the reservation at half its remaining time, and
moves to another relay as soon as the connection to its relay is gone or a refresh fails
(a reservation only lives as long as the connection to the relay: circuit relay v2's rule).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost

from petald.p2pnode.transport.host import parse_peer_address
from petald.p2pnode.transport.relay_client import RELAY_REQUEST_TIMEOUT_S, circuit_address, reserve

log = logging.getLogger(__name__)

MIN_REFRESH_S = 5.0  # never refresh more often than this, whatever expiry a relay gives
WATCH_S = 1.0  # how often the connection to the relay is looked at
RETRY_S = 10.0  # after every candidate refused, the wait before asking them again


class RelayReservation:
    def __init__(self, host: IHost, candidates: Callable[[], Awaitable[list[str]]],
                 announce: Callable[[str], None] = log.info):
        """``candidates()``: full addresses (with /p2p/) of relays to try, best first."""
        self.host, self.candidates, self.announce = host, candidates, announce
        self.addresses: list[str] = []  # this node's circuit address while it holds a reservation
        self.relay: str | None = None
        self.reserved = trio.Event()  # set at the first reservation

    async def keep(self) -> None:
        """Hold a reservation until cancelled."""
        while True:
            for address in await self.candidates():
                if await self._hold(address):
                    break  # the relay went away: ask the candidates again at once
            else:
                await trio.sleep(RETRY_S)

    async def _hold(self, address: str) -> bool:
        """Reserve on the relay at ``address`` and keep it; False when it refuses at once."""
        me = self.host.get_id()
        try:
            relay = parse_peer_address(address).peer_id
            if relay == me:
                return False
            with trio.fail_after(RELAY_REQUEST_TIMEOUT_S):
                await self.host.connect(parse_peer_address(address))
            expires = await reserve(self.host, relay)
        except Exception as exc:
            log.info("relay %s refused a reservation: %s", address, exc)
            return False
        self.relay, self.addresses = address, [circuit_address(address, me)]
        self.announce(f"reachable through relay {address}")
        self.reserved.set()
        try:
            refresh_at = time.time() + max(MIN_REFRESH_S, (expires - time.time()) / 2)
            while self.host.get_network().get_connections(relay):
                await trio.sleep(WATCH_S)
                if time.time() >= refresh_at:
                    try:
                        expires = await reserve(self.host, relay)
                    except Exception as exc:
                        log.info("relay %s refused a refresh: %s", address, exc)
                        break
                    refresh_at = time.time() + max(MIN_REFRESH_S, (expires - time.time()) / 2)
            self.announce(f"lost the reservation on relay {address}: looking for another relay")
            return True
        finally:
            self.relay, self.addresses = None, []
