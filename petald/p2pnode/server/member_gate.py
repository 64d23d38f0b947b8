"""A server's door in a swarm with revocable membership: a stream from a peer that is not on the
owner's signed member list gets a ``not_member`` error and nothing else (``swarm/membership.py``
keeps the list; ``server_node`` closes the connections of peers a new list removes)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from libp2p.abc import INetStream

from petald.p2pnode.server.stream_frames import send_error
from petald.p2pnode.swarm.membership import SwarmMembership
from petald.p2pnode.transport.framed_stream import FramedStream
from petald.protocol.limits import MAX_FIRST_FRAME_BYTES

StreamHandler = Callable[[INetStream], Awaitable[None]]


def members_only(handler: StreamHandler, members: SwarmMembership | None) -> StreamHandler:
    """``handler`` for members; non-members are refused before it reads a byte (None: no list, all admitted)."""
    if members is None:
        return handler

    async def admit(stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        if members.is_member(peer):
            await handler(stream)
            return
        refusal = members.refusal(peer)
        framed = FramedStream(stream, MAX_FIRST_FRAME_BYTES)
        await send_error(framed, refusal.code, refusal.message)
        await framed.close()

    return admit
