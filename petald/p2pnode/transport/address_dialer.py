"""Connecting to a peer through the first of its announced addresses that answers.

py-libp2p's own dial (``host.connect``) tries only the first TCP address it knows of a peer
and, when that fails, refuses the whole peer for a while: one dead address in a record (a
stale interface, a forwarded port that was closed) would hide a server that answers on its
next address. Here each address is dialled in the record's order, each within
``DIAL_TIMEOUT_S``; one that does not answer is remembered for ``UNANSWERED_FOR_S``
(``UnansweredAddresses``, at most ``MAX_REMEMBERED`` of them) and meanwhile dialled only when
no other address of the peer answers: a peer whose only address failed once (a slow moment)
is not hidden for that long, and a dead address never delays a good one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStoreError

from petald.p2pnode.transport.relay_client import dial_circuit, is_circuit_address

# One address's TCP connect plus the Noise and yamux handshakes: about 4 round trips with the
# pipelined negotiation, 0.4 s at 100 ms (tests/test_wan_delays.py dials through such delays).
# 10 s (py-libp2p's own default) leaves room for a busy machine's handshake and a slow uplink;
# an address that did not answer is tried last afterwards, so it costs this once.
DIAL_TIMEOUT_S = 10.0
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


def _connected_address(host: IHost, peer: ID, addresses: Sequence[str],
                       unanswered: UnansweredAddresses) -> str | None:
    """The announced address ``host`` is connected to ``peer`` through, None when not connected.
    A connection the peer opened comes from no announced address: the first one not skipped
    stands for it."""
    connections = host.get_network().get_connections(peer)
    if not connections or not addresses:
        return None
    remote = {str(a) for c in connections for a in c.get_transport_addresses()}
    through = [a for a in addresses if str(_without_peer_id(a)) in remote]
    return next(iter(through), next((a for a in addresses if not unanswered.skips(a)), addresses[0]))


def _put_first(host: IHost, peer: ID, answered: multiaddr.Multiaddr, dead: list[multiaddr.Multiaddr]) -> None:
    """Reorder what the peerstore knows of ``peer``: ``answered`` first, ``dead`` gone. py-libp2p's
    later dials (a stream after the connection dropped, a DHT query) try only its first TCP one."""
    store = host.get_peerstore()
    drop = {str(a) for a in [answered, *dead]}
    try:
        known = store.addrs(peer)
    except PeerStoreError:
        known = []  # expired meanwhile: the answered address alone
    others = [a for a in known if str(_without_peer_id(str(a))) not in drop]
    store.clear_addrs(peer)
    store.add_addrs(peer, [answered, *others], 600)


async def connect_first_answering(host: IHost, peer_id: str, addresses: Sequence[str],
                                  unanswered: UnansweredAddresses, dial_timeout: float = DIAL_TIMEOUT_S) -> str:
    """Connect ``host`` to ``peer_id`` through the first of ``addresses`` (its announced ones, in
    order; those that did not answer lately last) that answers; return that address. Raise
    ConnectionError naming each failure when none does."""
    peer = ID.from_base58(peer_id)
    connected = _connected_address(host, peer, addresses, unanswered)
    if connected is not None:
        return connected  # an earlier dial, or the peer dialled us: nothing to dial
    stale = [a for a in addresses if unanswered.skips(a)]
    failures: list[str] = []
    for address in [*(a for a in addresses if a not in stale), *stale]:
        circuit = is_circuit_address(address)
        try:
            maddr = multiaddr.Multiaddr(address) if circuit else _without_peer_id(address)
            with trio.fail_after(dial_timeout):
                if circuit:  # through the relay it names (relay_client); the swarm's dial skips these
                    await dial_circuit(host, address)
                else:
                    await host.get_network().dial_addr(maddr, peer)
        except trio.TooSlowError:
            failures.append(f"{address}: no answer within {dial_timeout:.0f} s")
        except Exception as exc:
            failures.append(f"{address}: {exc or type(exc).__name__}")
        else:
            unanswered.forget(address)
            if circuit:  # later dials go through the relay too (circuit_dialing)
                host.get_peerstore().add_addrs(peer, [maddr], 600)
            else:
                _put_first(host, peer, maddr, [_without_peer_id(a) for a in addresses
                                               if unanswered.skips(a) and not is_circuit_address(a)])
            return address
        unanswered.remember(address)
    raise ConnectionError(f"no address of ..{peer_id[-8:]} answered: " + "; ".join(failures) if failures
                          else f"..{peer_id[-8:]} announces no address")
