"""Dialling peers at their relay addresses, under the host's own ``connect`` and ``new_stream``.

py-libp2p 0.8.1's swarm drops every ``/p2p-circuit`` address when it dials a peer
(``libp2p/network/swarm.py``, ``Swarm.dial_peer``: "Skip relay (p2p-circuit) addresses: this
node has no relay transport"), and it has no place to register one. ``install_circuit_dialing``
wraps that one method on a petald host's swarm: a peer with a relay address in the peer store is
dialled through its relay (``relay_client.dial_circuit``) before its other addresses, so every
caller (clients opening sessions, servers pushing, DHT queries) reaches a relayed server without
knowing it is relayed. A peer that announces a relay address has found itself unreachable, so
its direct addresses are only tried when every relay fails. A peer the host cannot dial with
what it knows is looked up with ``find_addresses`` where the node sets one (a server sets its
DHT's record lookup: a server pushing to the next server, relayed or not, learns its announced
addresses from the swarm), then dialled once more.
"""

from __future__ import annotations

import contextvars
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetConn
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID

from petald.p2pnode.transport.relay_client import RelayRefused, dial_circuit, is_circuit_address

log = logging.getLogger(__name__)

FOUND_TTL_S = 600  # how long an address found by lookup stays in the peer store
# Set while a lookup runs (trio's child tasks inherit it): the lookup's own dials (DHT queries)
# never start lookups of their own, which could recurse without end while peers are unreachable.
_in_lookup: contextvars.ContextVar[bool] = contextvars.ContextVar("petald_in_lookup", default=False)


def relay_addresses_of(host: IHost, peer: ID) -> list[str]:
    """The peer's relay addresses in the peer store, each ending in ``/p2p/PEER``."""
    try:
        known = host.get_peerstore().addrs(peer)
    except Exception:
        return []
    suffix = f"/p2p/{peer.to_base58()}"
    out = []
    for address in map(str, known):
        if is_circuit_address(address):
            full = address if address.endswith(suffix) else address + suffix
            if full not in out:
                out.append(full)
    return out


AddressFinder = Callable[[ID], Awaitable[list[str]]]  # a peer's announced addresses (full, with /p2p/)
_finders: weakref.WeakKeyDictionary[Any, list[AddressFinder]] = weakref.WeakKeyDictionary()


def set_address_finder(host: IHost, find_addresses: AddressFinder) -> None:
    """Where the host looks up a peer it cannot dial with what its peer store holds."""
    _finders[host.get_network()] = [find_addresses]


def _store_form(address: str, peer: ID) -> multiaddr.Multiaddr:
    """An announced address as the peer store keeps it: a direct one without its /p2p/PEER."""
    suffix = f"/p2p/{peer.to_base58()}"
    if not is_circuit_address(address) and address.endswith(suffix):
        address = address[:-len(suffix)]
    return multiaddr.Multiaddr(address)


def install_circuit_dialing(host: IHost) -> None:
    network: Any = host.get_network()
    dial_known = network.dial_peer
    dialling: dict[ID, trio.Lock] = {}  # one circuit dial per peer at a time; the others wait and reuse it

    def live(peer: ID) -> list[INetConn]:
        return [c for c in network.get_connections(peer) if not getattr(c, "is_closed", False)]

    async def dial_direct(peer_id: ID) -> list[INetConn]:
        try:
            return await dial_known(peer_id)
        except SwarmException:
            finder = _finders.get(network)
            if not finder or _in_lookup.get() or relay_addresses_of(host, peer_id):
                raise
            token = _in_lookup.set(True)
            try:
                found = await finder[0](peer_id)
            finally:
                _in_lookup.reset(token)
            if not found:
                raise
            host.get_peerstore().add_addrs(peer_id, [_store_form(a, peer_id) for a in found], FOUND_TTL_S)
        if relay_addresses_of(host, peer_id):
            return await dial_peer(peer_id)  # through a relay first; its fallback is dial_known, not this
        return await dial_known(peer_id)

    async def dial_peer(peer_id: ID) -> list[INetConn]:
        circuits = relay_addresses_of(host, peer_id)
        if not circuits or live(peer_id):
            return await dial_direct(peer_id)
        lock = dialling.setdefault(peer_id, trio.Lock())
        try:
            async with lock:
                if connections := live(peer_id):
                    return connections
                failures = []
                for address in circuits:
                    try:
                        return [await dial_circuit(host, address)]
                    except RelayRefused as exc:
                        log.info("relay address %s failed: %s", address, exc)
                        failures.append(str(exc))
                try:
                    return await dial_direct(peer_id)
                except SwarmException as exc:
                    raise SwarmException("; ".join([*failures, str(exc)])) from None
        finally:
            if not lock.statistics().tasks_waiting:
                dialling.pop(peer_id, None)

    network.dial_peer = dial_peer
