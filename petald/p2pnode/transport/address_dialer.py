"""Connecting to a peer through the first of its announced addresses that answers.

py-libp2p's own dial (``host.connect``) tries only the first TCP address it knows of a peer
and, when that fails, refuses the whole peer for a while: one dead address in a record (a
stale interface, a forwarded port that was closed) would hide a server that answers on its
next address. Here each address is dialled in the record's order, each within
``DIAL_TIMEOUT_S``; one that does not answer is remembered for ``UNANSWERED_FOR_S`` and not
dialled again meanwhile (``UnansweredAddresses``, at most ``MAX_REMEMBERED`` of them).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

# One address's TCP connect plus the Noise and yamux handshakes: about 5 round trips, 0.5 s at
# 100 ms (tests/test_wan_delays.py dials through such delays). 5 s leaves room for a loaded
# server and a slow uplink, and bounds what a dead address costs before the next is tried.
DIAL_TIMEOUT_S = 5.0
UNANSWERED_FOR_S = 120.0  # how long an address that did not answer is skipped
MAX_REMEMBERED = 1024  # the oldest entries go first beyond this many


class UnansweredAddresses:
    """Addresses that did not answer lately, each until its time is up; bounded."""

    def __init__(self, skip_for: float = UNANSWERED_FOR_S, capacity: int = MAX_REMEMBERED,
                 clock: Callable[[], float] = time.monotonic):
        self.skip_for, self.capacity, self.clock = skip_for, capacity, clock
        self._until: OrderedDict[str, float] = OrderedDict()

    def remember(self, address: str) -> None:
        self._until.pop(address, None)
        self._until[address] = self.clock() + self.skip_for
        while len(self._until) > self.capacity:
            self._until.popitem(last=False)

    def forget(self, address: str) -> None:
        self._until.pop(address, None)

    def skips(self, address: str) -> bool:
        until = self._until.get(address)
        if until is None:
            return False
        if self.clock() >= until:
            del self._until[address]
            return False
        return True

    def __len__(self) -> int:
        return len(self._until)


def _without_peer_id(address: str) -> multiaddr.Multiaddr:
    maddr = multiaddr.Multiaddr(address)
    try:
        own = maddr.value_for_protocol("p2p")
    except Exception:
        return maddr
    return maddr.decapsulate(multiaddr.Multiaddr(f"/p2p/{own}")) if own else maddr


def _connected_address(host: IHost, peer: ID, addresses: Sequence[str]) -> str | None:
    """The address ``host`` is connected to ``peer`` through (the announced one when it is among
    ``addresses``), None when not connected."""
    connections = host.get_network().get_connections(peer)
    if not connections:
        return None
    remote = [str(a) for c in connections for a in c.get_transport_addresses()]
    announced = next((a for a in addresses if str(_without_peer_id(a)) in remote), None)
    return announced or (f"{remote[0]}/p2p/{peer.to_base58()}" if remote else addresses[0])


async def connect_first_answering(host: IHost, peer_id: str, addresses: Sequence[str],
                                  unanswered: UnansweredAddresses, dial_timeout: float = DIAL_TIMEOUT_S) -> str:
    """Connect ``host`` to ``peer_id`` through the first of ``addresses`` (its announced ones, in
    order) that answers; return that address. Raise ConnectionError naming each failure when
    none does (addresses skipped as unanswered lately count as failures)."""
    peer = ID.from_base58(peer_id)
    connected = _connected_address(host, peer, addresses)
    if connected is not None:
        return connected  # an earlier dial, or the peer dialled us: nothing to dial
    failures: list[str] = []
    for address in addresses:
        if unanswered.skips(address):
            failures.append(f"{address}: did not answer lately")
            continue
        try:
            maddr = _without_peer_id(address)
            with trio.fail_after(dial_timeout):
                await host.get_network().dial_addr(maddr, peer)
        except trio.TooSlowError:
            failures.append(f"{address}: no answer within {dial_timeout:.0f} s")
        except Exception as exc:
            failures.append(f"{address}: {exc or type(exc).__name__}")
        else:
            # Later dials by py-libp2p (a stream after the connection dropped) start from here.
            host.get_peerstore().add_addrs(peer, [maddr], 600)
            return address
        unanswered.remember(address)
    raise ConnectionError(f"no address of ..{peer_id[-8:]} answered: " + "; ".join(failures) if failures
                          else f"..{peer_id[-8:]} announces no address")
