"""The libp2p host every petald node runs: Noise as the only security, yamux as the only muxer.

py-libp2p's defaults also accept plaintext, secio and TLS, and mplex (measured at
~15 MB/s here); a petald node offers none of them. Its Noise and yamux are the
library's, on a leaner data path (``libp2p_internals``: same wire, fewer scheduler
passes per frame). This module uses the library's public API only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from petald.p2pnode.transport.announced_addresses import AddressPlan, is_loopback_swarm
from petald.p2pnode.transport.circuit_dialing import install_circuit_dialing
from petald.p2pnode.transport.libp2p_internals import LeanNoise, install, require_supported_library
from petald.p2pnode.transport.listen_port import refuse_shared_ports, refuse_taken_ports
from petald.p2pnode.transport.private_network import install_private_network
from petald.p2pnode.transport.swarm_key import SwarmKey
from petald.vocabulary import DEFAULT_LISTEN


def quiet_libp2p_logs() -> None:
    # py-libp2p logs routine disconnects at WARNING/ERROR with tracebacks; keep ours readable.
    for name in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def make_host(key_pair: KeyPair, listen: Sequence[str] = (DEFAULT_LISTEN,), *,
              check_library: Callable[[], None] = require_supported_library,
              addresses: AddressPlan | None = None, swarm_key: SwarmKey | None = None) -> IHost:
    """A host that is not yet listening; ``running_host`` also starts it.

    ``check_library`` runs first, before anything is built: a py-libp2p the lean data path does
    not fit stops us here, loudly (tests pass a check of their own). ``addresses``: what the
    host announces (``announced_addresses``); by default its listen addresses, loopback kept
    when it listens on loopback only. ``swarm_key``: a private swarm's; every connection, in or
    out, must prove it first (``private_network``).
    """
    check_library()
    noise = LeanNoise(key_pair, noise_privkey=new_x25519_pair().private_key)
    security = {TProtocol(NOISE_PROTOCOL_ID): noise}
    muxers = {TProtocol(YAMUX_PROTOCOL_ID): Yamux}
    # No auto-connector: by default py-libp2p keeps dialling every peer it has heard of
    # to hold 50+ connections; a petald node connects to the servers it routes through.
    # One connection per peer: py-libp2p's dial stops at the first connection only once it has
    # this many, and with its default of 3 every dial, even a good one, waits out the 250 ms
    # happy-eyeballs delay and then dials the peer's next address class too (a relay circuit
    # beside a direct connection). Every stream to a peer shares its one connection anyway.
    connections = ConnectionConfig(min_connections=0, low_watermark=0, auto_connect_interval=3600.0,
                                   max_connections_per_peer=1)
    plan = addresses or AddressPlan(loopback_swarm=is_loopback_swarm(listen, ()))
    host = new_host(key_pair=key_pair, sec_opt=security, muxer_opt=muxers,
                    listen_addrs=[multiaddr.Multiaddr(a) for a in listen], connection_config=connections,
                    addrs_factory=plan)
    plan.listening = host.get_transport_addrs  # so that the plan tells its own addresses from observed ones
    install(host)
    if swarm_key is not None:
        install_private_network(host, swarm_key)
    install_circuit_dialing(host)  # peers behind NAT are dialled at their relay addresses
    return host


@contextlib.asynccontextmanager
async def running_host(key_pair: KeyPair, listen: Sequence[str] = (DEFAULT_LISTEN,), *,
                       check_library: Callable[[], None] = require_supported_library,
                       addresses: AddressPlan | None = None,
                       swarm_key: SwarmKey | None = None) -> AsyncIterator[IHost]:
    """Make a host (``make_host``, which runs ``check_library`` first) and run it, listening on
    ``listen``, for the duration of the block.

    A fixed port something else holds is refused (PortInUse) before and after binding, and an
    address py-libp2p could not bind (it only logs that) is an OSError, not a silent node."""
    refuse_taken_ports(listen)
    host = make_host(key_pair, listen, check_library=check_library, addresses=addresses, swarm_key=swarm_key)
    async with host.run(listen_addrs=[multiaddr.Multiaddr(a) for a in listen]):
        bound = [str(a) for a in host.get_transport_addrs()]
        if len(bound) < len(listen):
            raise OSError(f"could not listen on {', '.join(listen)} (bound only {', '.join(bound) or 'nothing'}): "
                          "is the address one of this host's?")
        refuse_shared_ports(bound)
        yield host


def parse_peer_address(address: str) -> PeerInfo:
    """A full multiaddr with /p2p/ peer ID, or a ValueError that says what is wrong."""
    try:
        maddr = multiaddr.Multiaddr(address)
    except Exception as exc:
        raise ValueError(f"{address!r} is not a multiaddr: {exc}") from None
    try:
        return info_from_p2p_addr(maddr)
    except Exception:
        raise ValueError(f"{address!r} has no /p2p/<peer id> part; copy the full address a server prints") from None


def full_addresses(host: IHost) -> list[str]:
    """What ``host`` announces (its AddressPlan), each with /p2p/<its peer ID>."""
    peer = host.get_id().to_string()
    out = []
    for a in host.get_addrs():
        text = str(a)
        out.append(text if "/p2p/" in text else f"{text}/p2p/{peer}")
    return out


def local_addresses(host: IHost) -> list[str]:
    """Where a process on this machine reaches ``host``: its bound listen addresses, a wildcard
    as loopback (an announced address, a forwarded port or a proxy, may not loop back here)."""
    peer = host.get_id().to_string()
    out = []
    for a in host.get_transport_addrs():
        text = str(a)
        for wildcard, loopback in (("/ip4/0.0.0.0/", "/ip4/127.0.0.1/"), ("/ip6/::/", "/ip6/::1/")):
            if text.startswith(wildcard):
                text = loopback + text[len(wildcard):]
        out.append(f"{text}/p2p/{peer}")
    return out
