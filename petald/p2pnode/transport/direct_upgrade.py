"""Direct connection upgrade through relay (DCUtR): a relayed connection becomes a direct one
where the NATs allow it; where they do not, the relay carries on.

py-libp2p 0.8.1's ``DCUtRProtocol`` does the work: every 2 s it looks for relayed connections,
first dials the peer's non-relay addresses (which also covers a public peer dialling out to a NATed
one: the NATed side's outgoing dial passes its own NAT), then runs the DCUtR exchange over the
relayed connection and has both sides dial each other at once from their listen ports
(``Swarm.dial_addr(..., source=...)``; the TCP listener sets SO_REUSEPORT, so the dial can bind
the listen port): a TCP simultaneous open, which a port-preserving NAT that filters by remote
address and port lets through. The swarm then opens new streams on the direct connection
(it prefers direct over relayed).

One change for petald: the library closes the relayed connection 60 s after the upgrade, and with
it every stream on it; a petald inference session is one stream for its whole life, so
``DirectUpgrade`` closes the relayed connection only once no stream is left on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.tools.anyio_service import background_trio_service

from petald.p2pnode.transport.announced_addresses import is_loopback_swarm
from petald.p2pnode.transport.relay_client import is_circuit_address
from petald.vocabulary import DEFAULT_LISTEN

ALL_INTERFACES = "/ip4/0.0.0.0/tcp/0"
IDLE_CHECK_S = 5.0  # how often a relayed connection left beside a direct one is checked for streams


class DirectUpgrade(DCUtRProtocol):
    async def _close_relayed_conns_after_grace(self, peer_id: ID, grace: float = IDLE_CHECK_S) -> None:
        while True:
            await trio.sleep(grace)
            relayed = [c for c in self.host.get_network().get_connections(peer_id)
                       if any(is_circuit_address(a) for a in c.get_transport_addresses())]
            if not relayed or not await self._verify_direct_connection(peer_id):
                return
            for conn in relayed:
                if not conn.get_streams():  # its sessions have ended: the relay's slot is freed
                    await conn.close()


def client_listen(peers: list[str], direct_upgrade: bool) -> list[str]:
    """Where a client listens. Hole punching dials from the listen port, so a client that may
    punch towards servers beyond this machine listens on every interface (any port); a client of
    a loopback swarm, or one that does not punch, stays on loopback."""
    in_loopback_swarm = is_loopback_swarm((), peers)  # announced_addresses' rule, written once
    return [DEFAULT_LISTEN] if in_loopback_swarm or not direct_upgrade else [ALL_INTERFACES]


@contextlib.asynccontextmanager
async def direct_upgrades(host: IHost, enabled: bool = True) -> AsyncIterator[None]:
    """DCUtR on ``host`` while the block runs (nothing when not ``enabled``)."""
    if not enabled:
        yield
        return
    async with background_trio_service(DirectUpgrade(host)):
        yield
