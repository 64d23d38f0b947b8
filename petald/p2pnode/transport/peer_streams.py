"""Opening a protocol stream to a peer and reading one reply, with the failures a peer gives
(unreachable, too slow, gone, another petald version) named as ServerUnavailable, and an error
frame raised as RemoteError. Both roles use it: clients towards servers, servers pushing to the
next server."""

from __future__ import annotations

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from petald.p2pnode.transport.framed_stream import FramedStream, PeerGone
from petald.protocol.errors import RemoteError
from petald.protocol.messages import ErrorReply


class ServerUnavailable(Exception):
    """A server could not be reached, timed out, or does not speak our protocol."""


def _refused_protocol(exc: BaseException) -> bool:
    """True when the peer answered multistream-select with 'na': it does not speak the protocol."""
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ == "MultiselectClientError" or "protocol not supported" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _offered_petald_protocols(host: IHost, peer: ID) -> list[str]:
    try:
        return sorted(p for p in host.get_peerstore().get_protocols(peer) if str(p).startswith("/petald/"))
    except Exception:
        return []  # identify may not have run yet


async def open_stream(host: IHost, peer_id: str, protocol: str, timeout: float) -> FramedStream:
    peer = ID.from_base58(peer_id)
    try:
        with trio.fail_after(timeout):
            stream = await host.new_stream(peer, [TProtocol(protocol)])
    except trio.TooSlowError:
        raise ServerUnavailable(f"server ..{peer_id[-8:]} did not open a {protocol} stream within {timeout:.0f} s") from None
    except Exception as exc:
        if _refused_protocol(exc):
            offered = _offered_petald_protocols(host, peer)
            raise ServerUnavailable(
                f"server ..{peer_id[-8:]} does not speak {protocol}"
                + (f"; it speaks {', '.join(offered)}" if offered else "")
                + ": client and server run incompatible petald versions") from None
        raise ServerUnavailable(f"cannot reach server ..{peer_id[-8:]}: {exc or type(exc).__name__}") from None
    return FramedStream(stream, send_timeout=timeout)


async def receive_reply(framed: FramedStream, peer: str, timeout: float, what: str) -> dict:
    try:
        with trio.fail_after(timeout):
            msg = await framed.receive()
    except trio.TooSlowError:
        raise ServerUnavailable(f"server ..{peer[-8:]} did not answer {what} within {timeout:.0f} s") from None
    except PeerGone as exc:
        raise ServerUnavailable(f"server ..{peer[-8:]} went away during {what}: {exc}") from None
    if msg is None:
        raise ServerUnavailable(f"server ..{peer[-8:]} closed the stream during {what}")
    if msg.get("type") == "error":
        err = ErrorReply.from_wire(msg)
        raise RemoteError(f"..{peer[-8:]}", err.code, err.message)
    return msg
