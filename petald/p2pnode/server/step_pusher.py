"""A session's pushes: each step's output handed straight to the next server's session.

Without them, a decode step crosses the client between every two servers: server -> client,
client -> next server, with the client's own wake-up and codec in between. With them the
client names the next sessions of its route in the step (``Step.push``); the server sends its
output to the first of them as soon as it has it, and to the client as before, so the client
still holds every hop's input for a replay. A push is only a head start: the reply says whether
the output went (``StepOutput.pushed``), the client sends the step itself where it did not, and
also where a pushed step's answer is late (a push lost on the way). docs/protocol.md, "Pushing
steps", has the rules.
"""

from __future__ import annotations

import logging

import torch
import trio
from libp2p.abc import IHost

from petald.p2pnode.transport.framed_stream import FramedStream
from petald.p2pnode.transport.peer_streams import open_stream
from petald.protocol.limits import PUSH_PROTOCOL
from petald.protocol.messages import PushOpen, PushTarget, Step

log = logging.getLogger(__name__)

# Distinct next sessions one session may push to over its life (its route's next hop and that
# hop's replacements): a client cannot make a server open streams without end.
MAX_TARGETS_PER_SESSION = 8
# A push waits this long for the next server to take it (plus the frame's transfer time over the
# slowest link allowed for: FramedStream adds it), then the step goes without a push: the
# client's answer waits behind it. 50 round trips at 100 ms: a next server this slow to read is
# better skipped.
PUSH_SEND_TIMEOUT_S = 5.0


class StepPusher:
    """The pushes of one session on the server that sends them.

    It keeps one push stream, to the session's current next server, and opens it in the
    background (in the session's ``nursery``): no step waits for it, the steps to a new target
    just go without a push until it is open. Streams are opened only to peers this server can
    reach on its own (connected, or with addresses it learned from the swarm): a client names
    a peer and a session, never an address to dial. Each target gets one stream per session:
    one that could not be opened, broke, or was switched away from is not tried again.
    """

    def __init__(self, host: IHost, nursery: trio.Nursery, open_timeout: float):
        self.host, self.nursery, self.open_timeout = host, nursery, open_timeout
        self._target: tuple[str, bytes] | None = None  # (peer, token) of the stream open or being opened
        self._stream: FramedStream | None = None
        self._opening: trio.CancelScope | None = None
        self._tried: set[tuple[str, bytes]] = set()

    async def push(self, chain: list[PushTarget], position: int, hidden: torch.Tensor, wire: str) -> bool:
        """Send ``hidden`` to ``chain[0]`` as its step at ``position``, with the rest of the chain for it
        to pass on, in the wire format the target names (else ``wire``, the session's). True: the
        stream took the whole frame."""
        if not chain:
            return False
        first = chain[0]
        key = (first.peer_id, first.token)
        if self._target != key:
            if key in self._tried or len(self._tried) >= MAX_TARGETS_PER_SESSION:
                return False
            await self.close()
            self._tried.add(key)
            self._target = key
            self.nursery.start_soon(self._open, first.peer_id, first.token, key)
            return False
        if self._stream is None:
            return False  # still opening
        step = Step(first.step_id, position, hidden, first.wire or wire, push=chain[1:])
        try:
            await self._stream.send(step.to_wire())
        except Exception as exc:  # whatever broke, the client sends this step itself
            log.info("push to ..%s failed (%s); the client sends the steps itself", first.peer_id[-8:], exc)
            await self.close()
            return False
        return True

    async def _open(self, peer_id: str, token: bytes, key: tuple[str, bytes]) -> None:
        scope = self._opening = trio.CancelScope()
        framed: FramedStream | None = None
        try:
            with scope:
                framed = await open_stream(self.host, peer_id, PUSH_PROTOCOL, self.open_timeout)
                framed.send_timeout = PUSH_SEND_TIMEOUT_S
                await framed.send(PushOpen(token).to_wire())
            if not scope.cancelled_caught and self._target == key:
                self._stream, framed = framed, None  # handed over
                self.nursery.start_soon(self._watch, self._stream, key)
        except Exception as exc:
            log.info("cannot push to ..%s (%s); the client sends the steps itself", peer_id[-8:], exc)
        finally:
            if self._opening is scope:
                self._opening = None
            if framed is not None:  # failed, cancelled or superseded after it opened
                with trio.CancelScope(shield=True):
                    await framed.reset()

    async def _watch(self, framed: FramedStream, key: tuple[str, bytes]) -> None:
        """The receiver only ever speaks to refuse (an error frame) or ends the stream: either way,
        stop pushing there, so that the next steps are reported as not pushed."""
        try:
            msg = await framed.receive()
        except Exception as exc:
            msg = {"message": str(exc)}
        if self._stream is framed:
            reason = (msg or {}).get("message", "the stream ended")
            log.info("push stream to ..%s ended (%s); the client sends the steps itself", key[0][-8:], reason)
            await self.close()

    async def close(self) -> None:
        """Close the current stream (its receiver sees the end) and cancel any open in progress."""
        stream, self._stream, self._target = self._stream, None, None
        if self._opening is not None:
            self._opening.cancel()
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.close()
