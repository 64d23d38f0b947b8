"""Where an inference session's steps come from: its client's stream, and steps pushed to it.

A session without a push token reads its client's stream itself, as it always did. One with a
token gets a reader task that moves the client's messages into an unbuffered channel, which the
push handler (steps the previous server pushed, ``step_pusher.py``) feeds too, so the session
runs whichever step arrives first. Unbuffered: a feeder waits until the session takes its
message, so a session never holds more frames than the one it runs and one per feeding stream.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import trio

from petald.p2pnode.transport.framed_stream import FramedStream, PeerGone
from petald.protocol.errors import ProtocolError
from petald.protocol.messages import Step

FROM_CLIENT, PUSHED, BROKEN = "client", "push", "error"  # what an inbox entry is
RECENT_PUSHES = 4  # steps a push ran, remembered to recognise the client's late copies of them


class SessionInbox:
    def __init__(self, framed: FramedStream, channel: trio.MemoryReceiveChannel | None = None):
        """``channel``: the receiving side of a push-taking session's inbox (None: read ``framed``)."""
        self.framed, self.channel = framed, channel
        self._pushed: deque[tuple[int, int]] = deque(maxlen=RECENT_PUSHES)  # (position, tokens)

    async def next(self) -> tuple[str, Any]:
        """(FROM_CLIENT, message or None at the end of the stream) or (PUSHED, Step); raises what
        broke the client's stream."""
        if self.channel is None:
            return FROM_CLIENT, await self.framed.receive()
        kind, item = await self.channel.receive()
        if kind == BROKEN:
            raise item
        return kind, item

    def ran_pushed(self, step: Step) -> None:
        self._pushed.append((step.position, step.hidden.shape[1]))

    def already_ran(self, step: Step) -> bool:
        """Whether ``step`` from the client is a copy of a step a push ran (and answered) already:
        the client sends one when a push's answer is late, or when it was told nothing was pushed.
        (A pushed step that ran is in the cache: one that failed ended the session.)"""
        h = step.hidden
        return h.dim() == 3 and (step.position, h.shape[1]) in self._pushed


async def read_client(framed: FramedStream, channel: trio.MemorySendChannel) -> None:
    """Move a push-taking session's client messages into its inbox, up to the end of the stream."""
    async with channel:
        while True:
            try:
                msg = await framed.receive()
            except (ProtocolError, PeerGone) as exc:
                await channel.send((BROKEN, exc))
                return
            await channel.send((FROM_CLIENT, msg))
            if msg is None or msg.get("type") == "close":
                return
