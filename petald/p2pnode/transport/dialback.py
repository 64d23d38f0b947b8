"""Can others dial this node? Peers dial it back, as AutoNAT does, on ``/petald/dialback/1.0.0``.

py-libp2p 0.8.1's AutoNAT (``libp2p/host/autonat/autonat.py``) cannot answer that question: its
server dials back with ``host.connect``, which returns the connection the request came in on,
so every requester is told it is reachable. Here the helper opens a NEW TCP connection and runs
the Noise handshake on it (which proves that the node it reached holds the requester's peer ID),
then closes it; it never becomes a swarm connection.

The helper cannot be used to make it dial arbitrary addresses: it dials only the requester's own
observed IP (the address its request came from), on at most ``MAX_PORTS`` ports, never for a
request that came through a relay, at most one request per peer per ``MIN_INTERVAL_S`` and
``CONCURRENT_CHECKS`` at a time, each dial bounded by ``DIAL_TIMEOUT_S``.
"""

from __future__ import annotations

import ipaddress
import logging
import time

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from petald.p2pnode.transport.framed_stream import FramedStream, PeerGone
from petald.p2pnode.transport.peer_streams import ServerUnavailable, open_stream, receive_reply
from petald.p2pnode.transport.relay_client import is_circuit_address
from petald.protocol.errors import ErrorCode
from petald.protocol.messages import ErrorReply

DIALBACK_PROTOCOL = "/petald/dialback/1.0.0"
MAX_PORTS = 4  # ports one request may ask to be dialled on
DIAL_TIMEOUT_S = 5.0  # one dial back: TCP connect and Noise handshake
MIN_INTERVAL_S = 30.0  # between two requests of one peer (later ones are refused)
CONCURRENT_CHECKS = 4  # requests a helper works on at once (later ones wait, then are refused)
REQUEST_TIMEOUT_S = 15.0  # the requester's wait for an answer, opening the stream included
MAX_REQUEST_BYTES = 1024

log = logging.getLogger(__name__)


def listen_ports(host: IHost) -> list[int]:
    """The TCP ports this host listens on (what a helper dials back, on the IP it sees)."""
    ports = []
    for address in host.get_addrs():
        try:
            port = int(address.value_for_protocol("tcp"))
        except Exception:
            continue
        if port not in ports and not is_circuit_address(address):
            ports.append(port)
    return ports[:MAX_PORTS]


def _ip_protocol(ip: str) -> str:
    return "ip6" if ipaddress.ip_address(ip).version == 6 else "ip4"


class DialBackHelper:
    """The helper's side: dial a requester back on its observed IP, under the limits above."""

    def __init__(self, host: IHost):
        self.host = host
        self._last_request: dict[ID, float] = {}
        self._slots = trio.Semaphore(CONCURRENT_CHECKS)

    def register(self) -> None:
        self.host.set_stream_handler(DIALBACK_PROTOCOL, self._handle)  # type: ignore[arg-type]

    async def _handle(self, stream: INetStream) -> None:
        framed = FramedStream(stream, max_frame_bytes=MAX_REQUEST_BYTES, send_timeout=REQUEST_TIMEOUT_S)
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                request = await framed.receive()
                reply = await self._answer(stream, request)
                await framed.send(reply)
        except (trio.TooSlowError, PeerGone, Exception) as exc:  # a bad request never takes the helper down
            log.debug("dial-back request failed: %s", exc)
        finally:
            await stream.close()

    async def _answer(self, stream: INetStream, request: dict | None) -> dict:
        peer = stream.muxed_conn.peer_id
        ports = (request or {}).get("ports")
        if not isinstance(ports, list) or not 0 < len(ports) <= MAX_PORTS or \
                not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
            return ErrorReply(ErrorCode.BAD_MESSAGE, f"ports: a list of 1 to {MAX_PORTS} TCP ports").to_wire()
        if any(is_circuit_address(a) for a in stream.muxed_conn.get_transport_addresses()):
            return ErrorReply(ErrorCode.BAD_STATE, "no dial-back for a request through a relay").to_wire()
        remote = stream.get_remote_address()
        if not remote:
            return ErrorReply(ErrorCode.BAD_STATE, "the requester's IP address is unknown").to_wire()
        now = time.monotonic()
        if now - self._last_request.get(peer, float("-inf")) < MIN_INTERVAL_S:
            return ErrorReply(ErrorCode.BUSY, f"one dial-back per {MIN_INTERVAL_S:.0f} s").to_wire()
        self._last_request = {p: t for p, t in self._last_request.items() if now - t < MIN_INTERVAL_S}
        self._last_request[peer] = now
        try:
            with trio.fail_after(DIAL_TIMEOUT_S):
                await self._slots.acquire()
        except trio.TooSlowError:
            return ErrorReply(ErrorCode.BUSY, "too many dial-backs at once").to_wire()
        try:
            ip = remote[0]
            reached = []
            for port in ports:
                address = f"/{_ip_protocol(ip)}/{ip}/tcp/{port}"
                if await self._dial(multiaddr.Multiaddr(address), peer):
                    reached.append(address)
            return {"type": "dialback_result", "reached": reached, "observed_ip": ip}
        finally:
            self._slots.release()

    async def _dial(self, address: multiaddr.Multiaddr, peer: ID) -> bool:
        """A fresh TCP connection to ``address`` whose Noise handshake proves ``peer``; closed at once."""
        network = self.host.get_network()
        transport = network.transport_manager.transport_for_dialing(address)  # type: ignore[attr-defined]
        raw = None
        try:
            with trio.fail_after(DIAL_TIMEOUT_S):
                raw = await transport.dial(address)
                secured = await network.upgrader.upgrade_security(raw, True, peer)  # type: ignore[attr-defined]
                await secured.close()
            return True
        except Exception as exc:  # unreachable, refused, wrong peer, too slow: all mean "not reached"
            log.debug("dial-back to %s failed: %s", address, exc)
            return False
        finally:
            if raw is not None:
                with trio.move_on_after(1.0):
                    await raw.close()


async def ask_dial_back(host: IHost, helper: str) -> list[str]:
    """Ask ``helper`` (a peer ID) to dial this host back; the addresses it reached (may be empty).

    Raises ServerUnavailable when the helper cannot be asked or refuses.
    """
    ports = listen_ports(host)
    if not ports:
        return []
    framed = await open_stream(host, helper, DIALBACK_PROTOCOL, REQUEST_TIMEOUT_S)
    try:
        with trio.fail_after(REQUEST_TIMEOUT_S):
            await framed.send({"type": "dialback", "ports": ports})
        reply = await receive_reply(framed, helper, REQUEST_TIMEOUT_S + MAX_PORTS * DIAL_TIMEOUT_S, "a dial-back")
    except trio.TooSlowError:
        raise ServerUnavailable(f"helper ..{helper[-8:]} did not take a dial-back request") from None
    except Exception as exc:
        if isinstance(exc, ServerUnavailable):
            raise
        raise ServerUnavailable(f"helper ..{helper[-8:]} refused a dial-back: {exc}") from None
    finally:
        await framed.stream.close()
    reached = reply.get("reached")
    return [a for a in reached if isinstance(a, str)] if isinstance(reached, list) else []
