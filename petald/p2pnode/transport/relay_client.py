"""The client half of circuit relay v2: reserve a slot on a relay, and dial a peer through one.

The relay's half (hop) and the destination's half (stop) are py-libp2p's ``CircuitV2Protocol``
(``relay_service``). These two requests are written here, on the library's messages and
delimited framing, because the library's ``CircuitV2Transport`` does more than asked: it reserves
a slot on every relay it dials through (a client would take slots meant for servers) and reads
replies to stored circuit addresses without a timeout.

A relayed connection is an ordinary libp2p connection whose bytes travel inside one yamux
stream to the relay: Noise and yamux run over that stream exactly as over TCP (the lean data
path stays off it: ``lean_transport`` puts only TCP connections on its buffered reader).
"""

from __future__ import annotations

from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost, INetConn
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

CIRCUIT = "/p2p-circuit"
RELAY_REQUEST_TIMEOUT_S = 10.0  # one RESERVE or CONNECT exchange with a relay, opening the stream included


class RelayRefused(Exception):
    """A relay could not be reached, or refused or failed a reservation or a circuit."""


def is_circuit_address(address: str | multiaddr.Multiaddr) -> bool:
    return CIRCUIT in str(address)


@dataclass(frozen=True)
class CircuitAddress:
    """``[RELAY_TRANSPORT]/p2p/RELAY/p2p-circuit/p2p/DEST``, taken apart."""

    relay: ID
    relay_address: str  # the relay's own address, with its /p2p/ part ('' when only the ID is known)
    destination: ID

    @classmethod
    def parse(cls, address: str) -> CircuitAddress:
        try:
            multiaddr.Multiaddr(address)  # checks every part, peer IDs included
        except Exception as exc:
            raise ValueError(f"{address!r} is not a multiaddr: {exc}") from None
        relay_part, sep, rest = str(address).partition(CIRCUIT)
        if not sep or not rest.startswith("/p2p/") or "/p2p/" not in relay_part:
            raise ValueError(f"{address!r} is not a relay address (RELAY/p2p/RELAY_ID/p2p-circuit/p2p/PEER_ID)")
        try:
            destination = ID.from_base58(rest[len("/p2p/"):])
            relay = ID.from_base58(relay_part.rsplit("/p2p/", 1)[1])
        except Exception:
            raise ValueError(f"{address!r}: a peer ID in it is not valid") from None
        transport = relay_part.rsplit("/p2p/", 1)[0]
        return cls(relay, relay_part if transport else "", destination)


def circuit_address(relay_address: str, me: ID) -> str:
    """The address others dial to reach ``me`` through the relay at ``relay_address`` (with /p2p/)."""
    return f"{relay_address}{CIRCUIT}/p2p/{me.to_base58()}"


async def _exchange(host: IHost, relay: ID, request: HopMessage) -> tuple[object, HopMessage]:
    """Open a hop stream to ``relay``, send ``request``, read the STATUS; the stream stays open."""
    try:
        with trio.fail_after(RELAY_REQUEST_TIMEOUT_S):
            stream = await host.new_stream(relay, [HOP_PROTOCOL_ID])
    except trio.TooSlowError:
        raise RelayRefused(f"relay ..{relay.to_base58()[-8:]} did not open a hop stream within "
                           f"{RELAY_REQUEST_TIMEOUT_S:.0f} s") from None
    except Exception as exc:
        raise RelayRefused(f"cannot reach relay ..{relay.to_base58()[-8:]}: {exc or type(exc).__name__}") from None
    try:
        with trio.fail_after(RELAY_REQUEST_TIMEOUT_S):
            await write_delimited_msg(stream, request)
            reply = await read_delimited_msg(stream, HopMessage)
    except BaseException as exc:
        await stream.reset()
        if isinstance(exc, Exception):
            raise RelayRefused(f"relay ..{relay.to_base58()[-8:]} did not answer: {exc or type(exc).__name__}") from None
        raise
    status = StatusCode(reply.status) if reply.HasField("status") else StatusCode.UNUSED
    if status != StatusCode.OK:
        await stream.reset()
        raise RelayRefused(f"relay ..{relay.to_base58()[-8:]} refused: {status.name}")
    return stream, reply


async def reserve(host: IHost, relay: ID) -> int:
    """Reserve (or refresh) a slot on ``relay``; returns when it expires (Unix time)."""
    stream, reply = await _exchange(host, relay, HopMessage(type=HopMessage.RESERVE))
    await stream.close()  # type: ignore[attr-defined]
    return int(reply.reservation.expire) if reply.HasField("reservation") else 0


async def dial_circuit(host: IHost, address: str) -> INetConn:
    """A connection to the destination of circuit ``address``, through its relay.

    Security (Noise, checking the destination's peer ID) and yamux run over the relay stream;
    the connection joins the host's swarm like any other, so ``new_stream`` uses it.
    """
    circuit = CircuitAddress.parse(address)
    if circuit.relay_address:
        host.get_peerstore().add_addrs(circuit.relay, [multiaddr.Multiaddr(circuit.relay_address)], 600)
    request = HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=circuit.destination.to_bytes()))
    stream, _ = await _exchange(host, circuit.relay, request)
    raw = RawConnection(stream=stream, initiator=True, connection_type=ConnectionType.RELAYED,  # type: ignore[arg-type]
                        addresses=[multiaddr.Multiaddr(address)])
    try:
        with trio.fail_after(RELAY_REQUEST_TIMEOUT_S):
            return await host.upgrade_outbound_connection(raw, circuit.destination)
    except BaseException as exc:
        await stream.reset()  # type: ignore[attr-defined]
        if isinstance(exc, Exception):
            raise RelayRefused(f"no secure connection to ..{circuit.destination.to_base58()[-8:]} through relay "
                               f"..{circuit.relay.to_base58()[-8:]}: {exc or type(exc).__name__}") from None
        raise
