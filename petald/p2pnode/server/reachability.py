"""Is this server reachable, and if not, serving through a relay: no flag needed.

At start a server asks peers it is connected to (its initial peers) to dial it back
(``transport/dialback``). Reached by any: it is public, offers relay service (hop) to others,
switches its DHT to server mode (until then it only asks) and announces its own addresses.
Answered by some and reached by none: it is private, keeps a reservation on a public server (``transport/relay_reservation``; relays
among its initial peers first, then the swarm's public servers), keeps its DHT a client (peers
could not dial it for DHT queries) and announces its circuit address
``/…/p2p/RELAY/p2p-circuit/p2p/ME`` instead. Nobody answered (the first server of a new swarm):
public, since its peers will have to dial it.

``--reachability public|private`` overrides the check for operators who know better (a port
forward the helpers cannot see, a firewall that lets helpers in but not others), like
libp2p's ForceReachability; tests on 127.0.0.1 force ``private`` to exercise relays.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

from petald.p2pnode.swarm.dht import SERVERS_KEY, SwarmDHT
from petald.p2pnode.transport.circuit_dialing import set_address_finder
from petald.p2pnode.transport.dialback import DialBackHelper, ask_dial_back
from petald.p2pnode.transport.direct_upgrade import direct_upgrades
from petald.p2pnode.transport.host import full_addresses, parse_peer_address
from petald.p2pnode.transport.relay_client import is_circuit_address
from petald.p2pnode.transport.relay_reservation import RelayReservation
from petald.p2pnode.transport.relay_service import RelayService

log = logging.getLogger(__name__)

REACHABILITY_MODES = ("auto", "public", "private")
DIALBACK_HELPERS = 3  # peers asked at once
FIRST_RESERVATION_WAIT_S = 30.0  # a private server waits this long for a relay before it goes on
LOOKUP_TIMEOUT_S = 10.0  # finding a peer's relay address in the swarm


async def is_reachable(host: IHost, helpers: list[ID], announce: Callable[[str], None]) -> bool:
    """Ask up to DIALBACK_HELPERS of ``helpers`` to dial back: reached by one -> True."""
    reached: list[str] = []
    answered = 0

    async def ask(helper: ID) -> None:
        nonlocal answered
        try:
            found = await ask_dial_back(host, helper.to_base58())
        except Exception as exc:
            log.info("dial-back by ..%s failed: %s", helper.to_base58()[-8:], exc)
            return
        answered += 1
        reached.extend(found)

    async with trio.open_nursery() as nursery:
        for helper in helpers[:DIALBACK_HELPERS]:
            nursery.start_soon(ask, helper)
    if reached:
        announce(f"reachable: peers dialled this server back at {', '.join(sorted(set(reached)))}")
        return True
    if answered:
        announce(f"not reachable: {answered} peers could not dial this server back; serving through a relay")
        return False
    announce("no peer could check whether this server is reachable: assuming it is")
    return True


class ServerReachability:
    """What a server does about reachability, for as long as it runs (``running``)."""

    def __init__(self, host: IHost, mode: str, initial_peers: list[str], announce: Callable[[str], None], *,
                 direct_upgrade: bool = True):
        if mode not in REACHABILITY_MODES:
            raise ValueError(f"--reachability {mode!r}: choose one of {', '.join(REACHABILITY_MODES)}")
        self.host, self.mode, self.initial_peers, self.announce = host, mode, initial_peers, announce
        self.direct_upgrade = direct_upgrade
        self.public = mode != "private"
        self.reservation: RelayReservation | None = None
        self.dht: SwarmDHT | None = None

    async def decide(self) -> bool:
        """Public or private (asks the initial peers, connected by then, in ``auto`` mode)."""
        DialBackHelper(self.host).register()
        if self.mode == "auto":
            helpers = []
            for address in self.initial_peers[:DIALBACK_HELPERS]:
                info = parse_peer_address(address)
                with trio.move_on_after(LOOKUP_TIMEOUT_S):
                    with contextlib.suppress(Exception):  # an initial peer that is down is no helper
                        await self.host.connect(info)
                        helpers.append(info.peer_id)
            self.public = await is_reachable(self.host, helpers, self.announce)
        return self.public

    def addresses(self) -> list[str]:
        """What the server's record announces: its circuit address while private."""
        if self.public:
            return full_addresses(self.host)
        return list(self.reservation.addresses) if self.reservation else []

    async def _relay_candidates(self) -> list[str]:
        found: list[str] = []
        if self.dht is not None:
            try:
                with trio.fail_after(LOOKUP_TIMEOUT_S):
                    records = await self.dht.announcements([SERVERS_KEY])
                random.shuffle(records)  # relayed servers spread over the relays
                me = self.host.get_id().to_base58()
                found = [a for r in records if r.peer_id != me for a in r.addresses[:1] if not is_circuit_address(a)]
            except Exception as exc:
                log.info("could not read the swarm's servers for a relay: %s", exc)
        # The operator's own initial peers first, then the swarm's public servers.
        return [*self.initial_peers, *(a for a in found if a not in self.initial_peers)]

    async def _find_addresses(self, peer: ID) -> list[str]:
        if self.dht is None:
            return []
        with trio.move_on_after(LOOKUP_TIMEOUT_S):
            record = await self.dht.announcement_of(peer)
            return list(record.addresses) if record else []
        return []

    @contextlib.asynccontextmanager
    async def running(self, dht: SwarmDHT) -> AsyncIterator[None]:
        """Decide (``decide``), then relay service (hop only when public), DCUtR on relayed
        connections, a DHT that answers queries only when public, and while private a reservation
        kept fresh. ``dht`` has joined the swarm already, as a DHT client unless forced public."""
        self.dht = dht
        # Others answer DHT queries only once they were found to dial this server (SwarmDHT.answer_queries).
        await dht.answer_queries(await self.decide())
        set_address_finder(self.host, self._find_addresses)
        async with background_trio_service(RelayService(self.host, offer_hop=self.public)), \
                direct_upgrades(self.host, self.direct_upgrade):
            if self.public:
                yield
                return
            self.reservation = RelayReservation(self.host, self._relay_candidates, self.announce)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.reservation.keep)
                with trio.move_on_after(FIRST_RESERVATION_WAIT_S):
                    await self.reservation.reserved.wait()
                if not self.reservation.reserved.is_set():
                    self.announce(f"no relay took a reservation within {FIRST_RESERVATION_WAIT_S:.0f} s: "
                                  "clients cannot reach this server until one does")
                yield
                nursery.cancel_scope.cancel()
