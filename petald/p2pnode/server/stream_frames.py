"""What every protocol handler of a server does the same way on its stream: wait for the first
message (a silent peer gets a ``timeout`` error) and send an error frame."""

from __future__ import annotations

from typing import Any

import trio

from petald.p2pnode.transport.framed_stream import FramedStream
from petald.protocol.errors import ErrorCode, ProtocolError
from petald.protocol.messages import ErrorReply

ERROR_SEND_TIMEOUT_S = 5.0  # an error frame to a peer that does not read it is given up


async def receive_first(framed: FramedStream, timeout: float, what: str) -> dict[str, Any] | None:
    """A stream's first message (None: the peer closed it); a peer silent for ``timeout`` gets a
    ``timeout`` error naming ``what`` it should have sent."""
    with trio.move_on_after(timeout):
        return await framed.receive()
    raise ProtocolError(ErrorCode.TIMEOUT, f"no {what} within {timeout:.0f} s")


async def send_error(framed: FramedStream, code: ErrorCode, message: str) -> None:
    with trio.move_on_after(ERROR_SEND_TIMEOUT_S):
        try:
            await framed.send(ErrorReply(code.value, message).to_wire())
        except Exception:
            pass  # the peer may be gone; the session is being freed either way
