"""Circuit relay v2 on a petald node: py-libp2p's hop and stop protocol, under petald's limits.

Every server runs it. Its stop half lets a server behind NAT accept connections that come
through its relay; its hop half (offered by servers others can dial) relays them. A relay is
also a server with sessions of its own, so what one peer can take from it is bounded (the
limits below; docs/operations.md lists them). Where py-libp2p 0.8.1's relay is looser than
that, ``RelayService`` narrows it:

- a RESERVE may name any peer ID in its ``peer`` field and the library reserves for that ID, so
  one peer could fill every slot with made-up IDs: here a reservation is always for the peer on
  the connection;
- reservations of peers that have disconnected keep their slot until their TTL runs out in the
  library: here they are dropped first (the spec ties a reservation to a live connection), and
  one IP address holds at most ``MAX_RESERVATIONS_PER_IP``;
- the library bounds circuits per destination only: here also per source peer and in total;
- the library files open circuits by peer ID (``_active_relays``), and a circuit that ends closes
  the streams filed under its peers: with two circuits to one server (a client's and a pushing
  server's), the first to end would cut the other. Here each circuit closes its own two streams.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits, RelayResourceManager

log = logging.getLogger(__name__)

# What one relay gives away. A circuit carries one client's (or pushing server's) sessions to one
# relayed server: a few KB per decode token, a few MB per long prefill.
MAX_RESERVATIONS = 16  # relayed servers one relay serves at a time
MAX_RESERVATIONS_PER_IP = 4  # of those, from one IP address (servers behind one NAT share it)
RESERVATION_TTL_S = 600  # a reservation lapses unless refreshed (relay_reservation refreshes at half)
MAX_CIRCUITS_PER_DESTINATION = 8  # open circuits to one relayed server
MAX_CIRCUITS_PER_SOURCE = 4  # open circuits from one peer, to all destinations
MAX_CIRCUITS = 64  # open circuits in total
CIRCUIT_BYTES = 512 * 2**20  # both directions together; the circuit is reset past it (its sessions fail over)
CIRCUIT_DURATION_S = 3600  # a circuit is reset after this long (its sessions fail over, the client re-dials)
STREAM_TIMEOUT_S = 15  # reading, writing and closing the relay's own hop and stop messages


@dataclass(frozen=True)
class RelayServiceLimits:
    """The limits a relay applies; the defaults are the named constants above."""

    max_reservations: int = MAX_RESERVATIONS
    max_reservations_per_ip: int = MAX_RESERVATIONS_PER_IP
    reservation_ttl_s: int = RESERVATION_TTL_S
    max_circuits_per_destination: int = MAX_CIRCUITS_PER_DESTINATION
    max_circuits_per_source: int = MAX_CIRCUITS_PER_SOURCE
    max_circuits: int = MAX_CIRCUITS
    circuit_bytes: int = CIRCUIT_BYTES
    circuit_duration_s: int = CIRCUIT_DURATION_S

    def library_limits(self) -> RelayLimits:
        return RelayLimits(duration=self.circuit_duration_s, data=self.circuit_bytes,
                           max_circuit_conns=self.max_circuits_per_destination,
                           max_reservations=self.max_reservations, reservation_ttl=self.reservation_ttl_s)


def _remote_ip(stream: INetStream) -> str | None:
    try:
        remote = stream.get_remote_address()
    except Exception:
        return None
    return remote[0] if remote else None


class _Reservations(RelayResourceManager):
    """The library's reservation book, dropping reservations whose peer has gone before counting."""

    def _clean_expired(self) -> None:
        super()._clean_expired()
        for peer in [p for p in self._reservations if not self._is_peer_connected(p)]:
            del self._reservations[peer]


class _NoFiling(dict):  # type: ignore[type-arg]
    """Stands in for the library's ``_active_relays``: files nothing, so it closes nothing of another circuit."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


class RelayService(CircuitV2Protocol):
    """py-libp2p's circuit relay v2 (stop always; hop when ``offer_hop``) under ``limits``.

    Run it with ``libp2p.tools.anyio_service.background_trio_service``.
    """

    def __init__(self, host: IHost, *, offer_hop: bool, limits: RelayServiceLimits | None = None):
        limits = limits or RelayServiceLimits()
        super().__init__(host, limits=limits.library_limits(), allow_hop=offer_hop, read_timeout=STREAM_TIMEOUT_S,
                         write_timeout=STREAM_TIMEOUT_S, close_timeout=STREAM_TIMEOUT_S)
        self.service_limits = limits
        self.resource_manager = _Reservations(self.limits, host)
        self.reservation_ips: dict[ID, str] = {}
        self.circuits_from: collections.Counter[ID] = collections.Counter()
        self.refused = collections.Counter[str]()  # why requests were refused, for logs and tests
        self._active_relays = _NoFiling()

    @property
    def open_circuits(self) -> int:
        return sum(self.circuits_from.values())

    async def _refuse(self, stream: INetStream, code: StatusCode, why: str) -> None:
        self.refused[why] += 1
        log.info("relay refused %s from ..%s: %s", "request", str(stream.muxed_conn.peer_id)[-8:], why)
        with trio.move_on_after(STREAM_TIMEOUT_S):
            await self._send_status(stream, code, why)
        await self._close_stream(stream)  # a close, not a reset: a reset can overtake the status

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        # A reservation is for the peer on this connection, never for a peer the message names.
        msg.ClearField("peer")
        peer = stream.muxed_conn.peer_id
        ip = _remote_ip(stream)
        self.resource_manager._clean_expired()
        live = self.resource_manager._reservations
        if peer not in live:
            same_ip = sum(1 for p, other in self.reservation_ips.items() if p in live and other == ip)
            if ip is not None and same_ip >= self.service_limits.max_reservations_per_ip:
                await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "reservations per IP")
                return
            if len(live) >= self.service_limits.max_reservations:
                await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "reservations")
                return
        if ip is not None:
            self.reservation_ips[peer] = ip
        for gone in [p for p in self.reservation_ips if p not in live and p != peer]:
            del self.reservation_ips[gone]
        await super()._handle_reserve(stream, msg)

    async def _handle_connect(self, stream: INetStream, msg: HopMessage) -> None:
        source = stream.muxed_conn.peer_id
        if self.circuits_from[source] >= self.service_limits.max_circuits_per_source:
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "circuits per source")
            return
        if self.open_circuits >= self.service_limits.max_circuits:
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "circuits")
            return
        self.circuits_from[source] += 1
        try:
            await super()._handle_connect(stream, msg)
        finally:
            self.circuits_from[source] -= 1
            if not self.circuits_from[source]:
                del self.circuits_from[source]

    async def _relay_data(self, src_stream: INetStream, dst_stream: INetStream, peer_id: ID,
                          deadline: float | None = None, circuit_data_limit: list[int] | None = None) -> None:
        try:
            await super()._relay_data(src_stream, dst_stream, peer_id, deadline, circuit_data_limit)
        finally:
            # One direction has ended (end of stream, a reset, or a limit): the circuit is over.
            await self._close_stream(src_stream)
            await self._close_stream(dst_stream)

    def stats(self) -> dict[str, Any]:
        return {"reservations": len(self.resource_manager._reservations), "circuits": self.open_circuits,
                "refused": dict(self.refused)}
