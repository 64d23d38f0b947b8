"""Where an inference session's steps come from: its client's stream, and steps pushed to it.

A session without a push token reads its client's stream itself, as it always did. One with a
token gets a reader task that moves the client's messages into an unbuffered channel, which the
push handler (steps the previous server pushed, ``step_pusher.py``) feeds too, so the session
runs whichever step arrives first. Unbuffered: a feeder waits until the session takes its
message, so a session never holds more frames than the one it runs and one per feeding stream.

Copies are told apart by step id: the client numbers a session's steps 1, 2, 3, ... and a push
carries the id the client gave it, so a step whose id has run already is a copy (the client's
late one, or a push that lost the race). Positions cannot tell: a step may start before the
session's end (a rollback, docs/protocol.md), at a position an earlier step also started at.
"""

from __future__ import annotations

from typing import Any

import trio

from petald.p2pnode.transport.framed_stream import FramedStream, PeerGone
from petald.protocol.errors import ProtocolError
from petald.protocol.messages import Step

FROM_CLIENT, PUSHED, BROKEN = "client", "push", "error"  # what an inbox entry is


class SessionInbox:
    def __init__(self, framed: FramedStream, channel: trio.MemoryReceiveChannel | None = None):
        """``channel``: the receiving side of a push-taking session's inbox (None: read ``framed``)."""
        self.framed, self.channel = framed, channel
        self.last_step_id = -1  # of the last step run, from the client or pushed (ids start at 0 or more)

    async def next(self) -> tuple[str, Any]:
        """(FROM_CLIENT, message or None at the end of the stream) or (PUSHED, Step); raises what
        broke the client's stream."""
        if self.channel is None:
            return FROM_CLIENT, await self.framed.receive()
        kind, item = await self.channel.receive()
        if kind == BROKEN:
            raise item
        return kind, item

    def ran(self, step: Step) -> None:
        """``step`` runs now: its copies are skipped from here on."""
        self.last_step_id = step.step_id

    def already_ran(self, step: Step) -> bool:
        """Whether ``step`` is a copy of a step that ran (and was answered) already: the client sends
        one when a push's answer is late, or when it was told nothing was pushed. (A step that ran
        is in the cache: one that failed ended the session.)"""
        return step.step_id <= self.last_step_id


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
