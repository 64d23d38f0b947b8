"""The client's side of one inference session on one server: one stream, many steps."""

from __future__ import annotations

import secrets
import time

import torch
import trio
from libp2p.abc import IHost

from petald.kernels.sources.model_source import ModelIdentity
from petald.p2pnode.client.client_options import ClientOptions
from petald.p2pnode.client.link_bandwidth import LinkBandwidths, bandwidth_sample
from petald.p2pnode.routing.route import SpanHop
from petald.p2pnode.transport.first_failure import open_first_failure_nursery
from petald.p2pnode.transport.framed_stream import CLOSE_TIMEOUT_S, FramedStream, PeerGone
from petald.p2pnode.transport.peer_streams import ServerUnavailable, open_stream, receive_reply
from petald.protocol.limits import (
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    PUSH_TOKEN_BYTES,
    transfer_seconds,
)
from petald.protocol.messages import (
    CloseSession,
    InfoRequest,
    OpenSession,
    PushTarget,
    ServerInfo,
    SessionOpened,
    Step,
    StepOutput,
)
from petald.protocol.tensors import all_finite


async def fetch_info(host: IHost, peer_id: str, timeout: float = 15.0) -> ServerInfo:
    return (await timed_info(host, peer_id, timeout))[0]


async def timed_info(host: IHost, peer_id: str, timeout: float = 15.0) -> tuple[ServerInfo, float]:
    """The server's info, and the seconds from opening the stream to the answer: two round trips
    (the stream's negotiation, pipelined, and the request) plus the server's handling, which is
    what a hop costs the client beyond its compute. Routing adds it to each hop's cost; with one
    round trip alone, on loopback, measurement noise outweighed the cost of one hop more."""
    began = time.perf_counter()
    framed = await open_stream(host, peer_id, INFO_PROTOCOL, timeout)
    try:
        await framed.send(InfoRequest().to_wire())
        reply = await receive_reply(framed, peer_id, timeout, "an info request")
        rtt = time.perf_counter() - began
        return ServerInfo.from_wire(reply), rtt
    finally:
        await framed.close()


# A pushed step whose answer takes this much longer than the hop's last step (and at least
# ClientOptions.push_grace) is sent by the client too: the push may have been lost between the
# servers. The server runs whichever copy comes first and skips the other.
PUSH_GRACE_FACTOR = 4.0
# A step's hidden states on the wire, per value, at most (float32): what its transfer allowance counts.
WIRE_BYTES_PER_VALUE = 4


class RemoteSpanSession:
    def __init__(self, hop: SpanHop, framed: FramedStream, options: ClientOptions,
                 prompts: torch.Tensor | None = None, push_token: bytes = b"", wire: str = "float32",
                 bandwidths: LinkBandwidths | None = None):
        """``options``: the step timeout and the push grace. ``wire``: the session's wire format
        (``wire_choice.py``), both ways. ``bandwidths``: where the steps this client sends add
        their measure of the link (None: not measured).
        ``prompts`` [hop blocks, 1 or batch, P, hidden]: deep prompts for positions [0, P), sent along
        with the steps that cover them. ``push_token``: the server takes steps pushed to this session
        by servers that know it (the previous hop's)."""
        self.hop = hop
        self.framed = framed
        self.options = options
        self.prompts = prompts
        self.push_token = push_token
        self.wire = wire
        self.bandwidths = bandwidths
        self.position = 0
        self.step_seconds = 0.0  # the last step, from sending it (or the previous hop's answer) to the answer
        self.held_seconds: float | None = None  # how long the server said it held the last step
        self._step_ids = 0

    @classmethod
    async def open(cls, host: IHost, hop: SpanHop, identity: ModelIdentity, batch: int, max_length: int,
                   options: ClientOptions, prompts: torch.Tensor | None = None,
                   takes_pushes: bool = False, wire: str = "float32",
                   bandwidths: LinkBandwidths | None = None) -> RemoteSpanSession:
        peer = hop.server.peer_id
        step_timeout = options.step_timeout
        push_token = secrets.token_bytes(PUSH_TOKEN_BYTES) if takes_pushes else b""
        framed = await open_stream(host, peer, INFERENCE_PROTOCOL, step_timeout)
        try:
            await framed.send(OpenSession(identity.model_id, identity.fingerprint, hop.start, hop.end,
                                          batch, max_length, wire, adapter=options.adapter,
                                          push_token=push_token).to_wire())
            opened = SessionOpened.from_wire(await receive_reply(framed, peer, step_timeout, "opening a session"))
            if (opened.start, opened.end) != (hop.start, hop.end):
                raise ServerUnavailable(f"server ..{peer[-8:]} opened blocks {opened.start}:{opened.end}; "
                                        f"asked for {hop.start}:{hop.end}")
        except BaseException:
            with trio.CancelScope(shield=True):  # free the server's side even when we are cancelled
                await framed.reset()
            raise
        return cls(hop, framed, options, prompts, push_token, wire, bandwidths)

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        return (await self.step_pushing(hidden, []))[0]

    def push_target(self, wire: str = "") -> PushTarget | None:
        """Where the previous hop's server may push this session's next step, in the format ``wire``
        ("": the pushing session's own); None: it may not."""
        if not self.push_token or self._prompts_for(1) is not None:
            return None  # a step with deep prompts comes from the client, which holds them
        return PushTarget(self.hop.server.peer_id, self.push_token, self._step_ids + 1, wire)

    def _prompts_for(self, tokens: int) -> torch.Tensor | None:
        if self.prompts is not None and self.position < self.prompts.shape[2]:
            return self.prompts[:, :, self.position : self.position + tokens]
        return None

    async def step_pushing(self, hidden: torch.Tensor, push: list[PushTarget]) -> tuple[torch.Tensor, bool]:
        """Send ``hidden`` as the next step, asking the server to push its output along ``push``;
        returns the output and whether the server pushed it to ``push[0]``."""
        message = self._next_step(hidden, push).to_wire()
        moved = self.framed.bytes_sent + self.framed.bytes_received
        began = time.perf_counter()
        try:
            await self.framed.send(message)
        except PeerGone as exc:
            raise ServerUnavailable(f"server ..{self.hop.server.peer_id[-8:]} went away: {exc}") from None
        result = await self._output(hidden, began, push)
        if self.bandwidths is not None:  # a step of the client's own: all its bytes crossed this link
            moved = self.framed.bytes_sent + self.framed.bytes_received - moved
            self.bandwidths.record(self.hop.server.peer_id, bandwidth_sample(
                moved, self.step_seconds, self.hop.server.rtt, self.held_seconds))
        return result

    async def pushed_step(self, hidden: torch.Tensor, push: list[PushTarget]) -> tuple[torch.Tensor, bool]:
        """The output of the step the previous hop's server pushed here (``hidden``, as the client
        received it from that server), and whether this server pushed it on along ``push``.

        If the answer is late, the client sends the step too (the push may be lost) and keeps
        waiting for the one answer the server gives, to whichever copy it ran."""
        copy = self._next_step(hidden, push)
        began = time.perf_counter()
        # The answer comes after two transfers (the push to this server, its answer to the client),
        # which over a slow link take longer than any grace measured on decode steps.
        transfers = 2 * self._transfer_seconds(hidden)
        # Before half the wait for the answer, so that the copy has time to be answered.
        grace = min(max(self.options.push_grace, PUSH_GRACE_FACTOR * self.step_seconds) + transfers,
                    (self.options.step_timeout + transfers) / 2)
        copy_sent: list[float] = []
        async with open_first_failure_nursery() as nursery:
            nursery.start_soon(self._send_late_copy, copy, grace, copy_sent)
            result = await self._output(hidden, began, push, transfers)
            nursery.cancel_scope.cancel()
        if copy_sent:  # the hop's own time, not the wait for a push that never came
            self.step_seconds = time.perf_counter() - copy_sent[0]
        return result

    async def _send_late_copy(self, step: Step, delay: float, sent_at: list[float]) -> None:
        await trio.sleep(delay)
        with trio.CancelScope(shield=True):  # a frame cut off halfway would break the stream
            sent_at.append(time.perf_counter())
            try:
                await self.framed.send(step.to_wire())
            except PeerGone:
                pass  # the wait for the answer reports the broken stream

    def _next_step(self, hidden: torch.Tensor, push: list[PushTarget]) -> Step:
        """The session's next step (a new step id) carrying ``hidden`` and the deep prompts it owes."""
        self._step_ids += 1
        return Step(self._step_ids, self.position, hidden, self.wire, self._prompts_for(hidden.shape[1]), push)

    @staticmethod
    def _transfer_seconds(hidden: torch.Tensor) -> float:
        return transfer_seconds(hidden.numel() * WIRE_BYTES_PER_VALUE)

    async def _output(self, hidden: torch.Tensor, began: float, push: list[PushTarget],
                      transfers: float | None = None) -> tuple[torch.Tensor, bool]:
        """The server's answer to the step just sent, checked, and whether it pushed the output to
        ``push[0]`` (a claim of a push nobody asked for counts as none). The wait is the step timeout
        plus ``transfers`` (default: the answer's own transfer over the slowest link allowed for)."""
        peer = self.hop.server.peer_id
        transfers = self._transfer_seconds(hidden) if transfers is None else transfers
        out = StepOutput.from_wire(await receive_reply(self.framed, peer, self.options.step_timeout + transfers,
                                                       "a step"), self.wire)
        if out.step_id != self._step_ids or out.hidden.shape != hidden.shape:
            raise ServerUnavailable(f"server ..{peer[-8:]} answered step {out.step_id} with shape "
                                    f"{list(out.hidden.shape)}; expected step {self._step_ids}, {list(hidden.shape)}")
        if not all_finite(out.hidden):
            raise ServerUnavailable(f"server ..{peer[-8:]} answered step {out.step_id} with NaN or infinite values")
        self.position += hidden.shape[1]
        self.step_seconds = time.perf_counter() - began
        self.held_seconds = out.held_ms / 1000 if out.held_ms is not None else None
        # In float32 whatever the wire (exactly: every 16-bit or int8 value is one), so that what a
        # caller gets (run_blocks, hidden_states) does not change dtype with the hop's wire.
        return out.hidden.float(), out.pushed and bool(push)

    async def close(self) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await self.framed.send(CloseSession().to_wire())
            except PeerGone:
                pass
        await self.framed.close()
