"""A session's pushes: each step's output handed straight to the next server's session.

Without them, a decode step crosses the client between every two servers: server -> client,
client -> next server, with the client's own wake-up and codec in between. With them the
client names the next sessions of its route in the step (``Step.push``); the server sends its
output to the first of them as soon as it has it, and to the client as before, so the client
still holds every hop's input for a replay. A push is only a head start: the reply says whether
the output went (``StepOutput.pushed``), and where it did not, the client sends the step itself.
docs/protocol.md, "Pushing steps", has the rules.
"""

from __future__ import annotations

import logging

import torch
import trio
from libp2p.abc import IHost

from petald.p2pnode.framed_stream import FramedStream
from petald.p2pnode.host import parse_peer_address
from petald.p2pnode.remote_span import open_stream
from petald.protocol.limits import PUSH_PROTOCOL
from petald.protocol.messages import PushOpen, PushTarget, Step

log = logging.getLogger(__name__)

CLOSE_WAIT_S = 2.0  # for a replaced push stream's polite close, in the background


class StepPusher:
    """The pushes of one session on the server that sends them.

    It keeps one push stream, to the session's current next server, and opens it in the
    background (in the session's ``nursery``): no step waits for a dial, the first step to a
    new target just goes without a push. A target whose stream could not be opened or broke
    is not tried again in this session.
    """

    def __init__(self, host: IHost, nursery: trio.Nursery, open_timeout: float, send_timeout: float):
        self.host, self.nursery = host, nursery
        self.open_timeout, self.send_timeout = open_timeout, send_timeout
        self._target: tuple[str, bytes] | None = None  # (peer, token) of the stream open or being opened
        self._stream: FramedStream | None = None
        self._failed: set[tuple[str, bytes]] = set()

    async def push(self, chain: list[PushTarget], position: int, hidden: torch.Tensor, wire_dtype: str,
                   codec: str) -> bool:
        """Send ``hidden`` to ``chain[0]`` as its step at ``position``, with the rest of the chain for it
        to pass on. True: the stream took the whole frame."""
        if not chain:
            return False
        first = chain[0]
        key = (first.peer_id, first.token)
        if key in self._failed:
            return False
        if self._target != key:
            self._retire()
            self._target = key
            self.nursery.start_soon(self._open, first, key)
            return False
        if self._stream is None:
            return False  # still opening
        step = Step(first.step_id, position, hidden, wire_dtype, codec, push=chain[1:])
        try:
            await self._stream.send(step.to_wire())
        except Exception as exc:  # whatever broke, the client sends this step itself
            log.info("push to ..%s failed (%s); the client sends the steps itself", first.peer_id[-8:], exc)
            self._failed.add(key)
            self._retire()
            return False
        return True

    async def _open(self, target: PushTarget, key: tuple[str, bytes]) -> None:
        try:
            info = parse_peer_address(target.address)
            if info.peer_id.to_base58() != target.peer_id:
                raise ValueError(f"address {target.address} is not that of ..{target.peer_id[-8:]}")
            with trio.fail_after(self.open_timeout):
                await self.host.connect(info)
            framed = await open_stream(self.host, target.peer_id, PUSH_PROTOCOL, self.open_timeout)
            framed.send_timeout = self.send_timeout
        except Exception as exc:
            log.info("cannot push to ..%s (%s); the client sends the steps itself", target.peer_id[-8:], exc)
            self._failed.add(key)
            return
        try:
            await framed.send(PushOpen(target.token).to_wire())
        except Exception as exc:
            log.info("push stream to ..%s broke at once (%s)", target.peer_id[-8:], exc)
            self._failed.add(key)
            await _close(framed)
            return
        if self._target != key:  # the route moved on while this stream opened
            await _close(framed)
            return
        self._stream = framed

    def _retire(self) -> None:
        """Forget the current stream; it is closed in the background."""
        stream, self._stream, self._target = self._stream, None, None
        if stream is not None:
            self.nursery.start_soon(_close, stream)

    async def close(self) -> None:
        stream, self._stream, self._target = self._stream, None, None
        if stream is not None:
            await _close(stream)


async def _close(framed: FramedStream) -> None:
    with trio.move_on_after(CLOSE_WAIT_S):
        await framed.close()
