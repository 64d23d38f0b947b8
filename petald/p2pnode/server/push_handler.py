"""Steps other servers push into this server's sessions (``/petald/push``): each push-taking
session's inbox, found by its push token, and the handler of the streams that feed them.

The sending side is ``step_pusher.py``; docs/protocol.md, "Pushing steps", has the rules.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio
from libp2p.abc import INetStream

from petald.p2pnode.server.session_inbox import PUSHED
from petald.p2pnode.server.stream_frames import receive_first, send_error
from petald.p2pnode.transport.frame_budget import FrameBudget
from petald.p2pnode.transport.framed_stream import FramedStream, PeerGone
from petald.protocol.errors import ErrorCode, ProtocolError
from petald.protocol.limits import MAX_FIRST_FRAME_BYTES, MAX_FRAME_BYTES
from petald.protocol.messages import PushOpen, Step

if TYPE_CHECKING:
    from petald.p2pnode.server.block_server import ServerLimits

log = logging.getLogger(__name__)


class PushInboxes:
    def __init__(self, limits: ServerLimits, frame_budget: FrameBudget | None = None):
        self.limits, self.frame_budget = limits, frame_budget
        self._inboxes: dict[bytes, trio.MemorySendChannel] = {}  # by push token
        self._streams: dict[bytes, trio.CancelScope] = {}  # the push stream feeding each token's session

    def open(self, token: bytes) -> tuple[trio.MemorySendChannel, trio.MemoryReceiveChannel]:
        """A session's inbox for the steps pushed with ``token``, until ``close``. Unbuffered: a
        feeder waits until the session takes its step (``session_inbox.py``)."""
        if token in self._inboxes:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "another session here has this push token")
        send, receive = trio.open_memory_channel(0)
        self._inboxes[token] = send
        return send, receive

    def close(self, token: bytes, send: trio.MemorySendChannel, receive: trio.MemoryReceiveChannel) -> None:
        self._inboxes.pop(token, None)
        send.close()
        receive.close()  # a push handler still offering a step gets BrokenResourceError, not a wait

    async def handle(self, stream: INetStream) -> None:
        """Steps another server pushes to one of this server's sessions (the token names it).

        One push stream feeds a session at a time: a newer one (the previous hop's replacement)
        ends the older (reset). A stream that sends something that is not a step gets an error
        frame, which its sender watches for: it stops pushing and tells its client so. A pushed
        step that is wrong for its session is dropped there. Either way the session goes on, and
        its client sends a step itself whose answer is late."""
        framed = FramedStream(stream, MAX_FIRST_FRAME_BYTES, send_timeout=self.limits.open_timeout)
        peer = stream.muxed_conn.peer_id.to_string()[-8:]
        inbox: trio.MemorySendChannel | None = None
        token = b""
        scope = trio.CancelScope()
        clean_end = False
        try:
            with scope:
                msg = await receive_first(framed, self.limits.open_timeout, "push open")
                if msg is None:
                    clean_end = True
                    return
                token = PushOpen.from_wire(msg).token
                if token not in self._inboxes:
                    raise ProtocolError(ErrorCode.BAD_STATE, "no session here takes pushes with this token")
                inbox = self._inboxes[token].clone()
                if token in self._streams:
                    self._streams[token].cancel()
                self._streams[token] = scope
                framed.allow_frames_up_to(MAX_FRAME_BYTES, self.frame_budget)
                while True:
                    with trio.move_on_after(self.limits.idle_timeout) as idle:
                        msg = await framed.receive()
                    if idle.cancelled_caught:
                        return  # the pushing session is gone without a word: reset
                    if msg is None:
                        clean_end = True
                        return
                    await inbox.send((PUSHED, Step.from_wire(msg)))
        except ProtocolError as err:
            log.info("push stream from ..%s refused: %s", peer, err)
            await send_error(framed, err.code, err.message)
            clean_end = True  # the error frame must reach the sender, which a reset could drop
        except (PeerGone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the pusher went away or moved on, or the session ended: nothing was wrong here
        except Exception:  # a bug must cost one push stream, never the server
            log.exception("push stream from ..%s failed", peer)
        finally:
            if self._streams.get(token) is scope:
                del self._streams[token]
            if inbox is not None:
                inbox.close()
            if clean_end:
                await framed.close()
            else:  # the sender's next push fails at once instead of going nowhere
                await framed.reset()
