"""An inference session over a route: one remote span session per hop, stepped in order, that
survives servers dying, hanging or lying about their span.

Each hop keeps every input it was sent. When a hop's server fails (connection lost, error reply,
step timeout, an output of the wrong shape, a span it no longer serves) the session bans that
server, asks for a new route over the same blocks, replays the hop's inputs through the new
servers (which rebuilds their KV caches) and carries on with the step that failed. Hop
boundaries of the original route are kept, so hidden states read after a hop stay where the
caller asked for them.

With ``ClientOptions.push`` (the default), each step also names the route's next sessions, and each server
hands its output straight to the next one (``step_pusher.py``): the client reads every hop's
output as before, for its history, but sends only to the servers nobody pushed to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import trio
from libp2p.abc import IHost

from petald.kernels.deep_prompts import check_deep_prompts
from petald.kernels.sources.model_source import ModelIdentity
from petald.p2pnode.client.client_options import ClientOptions
from petald.p2pnode.client.failover import (
    SERVER_FAILURES,
    Failover,
    HopFailed,
    Recovery,
    RouteFinder,
    never_succeeds,
)
from petald.p2pnode.client.link_bandwidth import LinkBandwidths
from petald.p2pnode.client.remote_span import RemoteSpanSession
from petald.p2pnode.client.wire_choice import push_wire, session_wire
from petald.p2pnode.routing.bans import ServerBans
from petald.p2pnode.routing.route import SpanHop, SpanRoute
from petald.protocol.limits import MAX_ARRAY_LEN, MAX_TENSOR_BYTES
from petald.protocol.messages import PushTarget

# Steps of at most this many rows (batch x tokens) are pushed: decode steps, where the hops'
# overhead is what a token costs. A long prefill gains little from a push and would hold the
# pushing server's answer behind a large transfer.
PUSH_MAX_ROWS = 16
# A longer step (batch x tokens) is sent as several steps of at most this many rows. One step's
# compute must fit in the server's step timeout and the client's (30 s by default each): a whole
# near-context prompt in one step did not (issue 22, hole 4: 8,176 tokens of SmolLM2 on a CPU
# server), and a healthy server was banned for it. Each extra step costs one round trip per hop.
PREFILL_STEP_ROWS = 1024

log = logging.getLogger(__name__)


def token_chunks(hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Split along tokens into steps: none over ``PREFILL_STEP_ROWS`` rows, and no tensor on the wire
    over its limit (float32 worst case)."""
    if hidden.shape[1] == 0:
        raise ValueError("nothing to run: the input has no tokens")
    per_token = hidden.shape[0] * hidden.shape[2] * 4
    tokens = min(MAX_TENSOR_BYTES // 2 // per_token, PREFILL_STEP_ROWS // hidden.shape[0])
    return hidden.split(max(1, tokens), dim=1)


def history_before(inputs: list[torch.Tensor], position: int) -> list[torch.Tensor]:
    """The steps ``inputs`` ([batch, tokens, hidden] each, in order) cut to their first ``position`` tokens."""
    kept, held = [], 0
    for part in inputs:
        if held + part.shape[1] > position:
            if position > held:
                kept.append(part[:, : position - held])
            break
        kept.append(part)
        held += part.shape[1]
    return kept


@dataclass
class _Link:
    """One hop of the session: its server's session (opened lazily) and every input it was sent."""

    hop: SpanHop
    span: RemoteSpanSession | None = None
    inputs: list[torch.Tensor] = field(default_factory=list)
    replayed: bool = False  # a replacement link holds its history
    open_failure: Exception | None = None  # why opening it with the others failed (``_open_all``)


class InferenceSession:
    def __init__(self, host: IHost, route: SpanRoute, identity: ModelIdentity, batch: int, max_length: int,
                 options: ClientOptions | None = None, find_route: RouteFinder | None = None,
                 bans: ServerBans | None = None, deep_prompts: torch.Tensor | None = None,
                 bandwidths: LinkBandwidths | None = None):
        """``options`` (default: ``ClientOptions()``) name the wire (chosen per hop), the timeouts, the LoRA
        adapter every server applies and whether servers push step outputs on to the next server themselves.
        ``find_route`` finds replacements for failed servers (None: a failure is raised).
        ``deep_prompts`` [model blocks, 1 or batch, P, hidden] are added to positions [0, P) before each block.
        ``bandwidths``: the client's measured links, which its steps add to and its wire choice reads
        (None: this session's own)."""
        self.options = options = options or ClientOptions()
        self.host, self.route, self.identity = host, route, identity
        if deep_prompts is not None:
            # Checked here: a wrong shape would be refused by every server, and look like failing servers.
            # Indexed by block: the route's blocks [0, end) must be there, later ones are not used.
            end = route.hops[-1].end
            check_deep_prompts(deep_prompts[:end], end, batch, route.hops[0].server.info.hidden_size,
                               max_length, name="deep_prompts")
        self.deep_prompts = deep_prompts
        self.batch, self.max_length = batch, max_length
        self.find_route = find_route
        self.pushed_steps = 0  # hop steps whose input a server pushed (the client only read their output)
        self.bans = bans if bans is not None else ServerBans()
        self.bandwidths = bandwidths if bandwidths is not None else LinkBandwidths()
        self.links = [_Link(hop) for hop in route.hops]
        self.recoveries: list[Recovery] = []
        self.failover = Failover(self.bans, options.recovery_timeout, self.recoveries)
        self.position = 0
        self.bytes_received = self.bytes_sent = 0  # of the sessions closed or dropped so far, all hops

    async def open(self) -> None:
        """Open a session on every hop now, so that a full server is replaced before the first step."""
        try:
            await self._open_all()
            await self._through(None)  # replaces the servers whose open failed
        except BaseException:
            await self.close()
            raise

    async def _open_all(self) -> None:
        """Open every link's session at once: each open is a few round trips, which at internet
        distances add up when taken one after another. A link whose open fails keeps its failure
        for ``_through``, which replaces its server without trying it again."""
        async def open_link(link: _Link) -> None:
            try:
                link.span = await self._open_span(link.hop)
            except SERVER_FAILURES as exc:
                link.open_failure = exc

        async with trio.open_nursery() as nursery:
            for link in self.links:
                if link.span is None:
                    nursery.start_soon(open_link, link)

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``hidden`` [batch, tokens, hidden_size] through every hop; returns the last hop's output."""
        states = await self.step_states(hidden)
        return states[self.route.hops[-1].end]

    async def step_states(self, hidden: torch.Tensor) -> dict[int, torch.Tensor]:
        """Like ``step``, but returns the output after every hop, keyed by the hop's end block."""
        hidden_size = self.route.hops[0].server.info.hidden_size
        if hidden.dim() != 3 or hidden.shape[0] != self.batch or hidden.shape[1] < 1 or hidden.shape[2] != hidden_size:
            raise ValueError(f"hidden has shape {list(hidden.shape)}; this session takes "
                             f"[{self.batch}, tokens >= 1, {hidden_size}]")
        if self.position + hidden.shape[1] > self.max_length:
            raise ValueError(f"session holds {self.max_length} tokens; this step would reach "
                             f"{self.position + hidden.shape[1]}")
        parts: list[dict[int, torch.Tensor]] = []
        for part in token_chunks(hidden):  # a long prompt as several steps, each within the step timeouts
            parts.append(await self._through(part))
            self.position += part.shape[1]
        if len(parts) == 1:
            return parts[0]
        return {end: torch.cat([states[end] for states in parts], dim=1) for end in parts[0]}

    def rollback(self, position: int) -> None:
        """Forget the tokens from ``position`` on: the next step starts there, and each server drops
        what it holds past it when that step arrives (docs/protocol.md, "Rolling back"). What each hop
        was sent is cut to match, so that a replay after a failure rebuilds the history kept."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot roll back to position {position}: the session holds {self.position} tokens")
        for link in self.links:
            link.inputs = history_before(link.inputs, position)
            if link.span is not None:
                link.span.position = position
        self.position = position

    async def _through(self, hidden: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """Send ``hidden`` through every link (None: only open them), replacing failed ones."""
        states: dict[int, torch.Tensor] = {}
        deadline: float | None = None  # of the recovery under way, from the first failure of this step
        index = 0
        pushed = False  # the previous link's server pushed this link's input to it
        while index < len(self.links):
            link = self.links[index]
            try:
                if link.span is None:
                    failure, link.open_failure = link.open_failure, None
                    if failure is not None:
                        raise failure
                    link.span = await self._open_span(link.hop)
                if hidden is not None:
                    chain = self._push_chain(index, hidden)
                    if pushed:
                        out, pushed = await link.span.pushed_step(hidden, chain)
                        self.pushed_steps += 1
                    else:
                        out, pushed = await link.span.step_pushing(hidden, chain)
                    link.inputs.append(hidden)
                    states[link.hop.end] = hidden = out
                    # Only a computed step clears a server: one that opens sessions and then fails
                    # every step must see its ban grow.
                    self.bans.forgive(link.hop.server.peer_id)
            except SERVER_FAILURES as exc:
                if self.find_route is None or never_succeeds(exc):
                    raise
                deadline = self.failover.deadline() if deadline is None else deadline
                await self._replace(index, exc, deadline)
                pushed = False
                continue  # the same input, to the replacement's first link
            index += 1
        return states

    def _push_chain(self, index: int, hidden: torch.Tensor) -> list[PushTarget]:
        """The open sessions after link ``index`` that may take this step by push, up to the first
        that may not (not open yet, or owed deep prompts)."""
        chain: list[PushTarget] = []
        if not self.options.push or hidden.shape[0] * hidden.shape[1] > PUSH_MAX_ROWS:
            return chain
        sender = self.links[index]
        for link in self.links[index + 1 : index + 1 + MAX_ARRAY_LEN]:
            if link.span is None or sender.span is None:
                break
            wire = push_wire(self.options.wire, sender.hop.server, link.hop.server, self.batch)
            # Named only where it differs from the pushing session's own (absent: that one).
            target = link.span.push_target("" if wire == sender.span.wire else wire)
            if target is None:
                break
            chain.append(target)
            sender = link
        return chain

    async def _open_span(self, hop: SpanHop) -> RemoteSpanSession:
        prompts = self.deep_prompts[hop.start : hop.end] if self.deep_prompts is not None else None
        # The first blocks' input is the client's own: their session never takes pushes.
        return await RemoteSpanSession.open(self.host, hop, self.identity, self.batch, self.max_length,
                                            self.options, prompts, takes_pushes=self.options.push and hop.start > 0,
                                            wire=session_wire(self.options.wire, hop.server, self.batch,
                                                              self.bandwidths),
                                            bandwidths=self.bandwidths)

    async def _replace(self, index: int, failure: BaseException, deadline: float) -> None:
        """Ban the server of link ``index``, route its blocks anew and replay its inputs there
        (``Failover.reroute``: a replacement failing during the replay is replaced in turn)."""
        assert self.find_route is not None
        noticed = trio.current_time()
        failed = self.links[index]
        await self._abandon(failed)
        inputs = failed.inputs

        async def replay(route: SpanRoute) -> None:
            fresh = [_Link(hop) for hop in route.hops]
            fresh[0].inputs = inputs
            try:
                await self._replay(fresh)
            except SERVER_FAILURES as exc:
                for link in fresh:
                    await self._abandon(link)
                raise HopFailed(next(link for link in fresh if not link.replayed).hop, exc) from None
            self.links[index:index + 1] = fresh

        replayed = sum(x.shape[1] for x in inputs)
        start, end = failed.hop.start, failed.hop.end
        route = await self.failover.reroute(HopFailed(failed.hop, failure), start, end, deadline, self.find_route,
                                            replay, replayed, noticed)
        log.warning("blocks %d:%d recovered on %s after replaying %d tokens", start, end, route.describe(), replayed)

    async def _replay(self, fresh: list[_Link]) -> None:
        """Open each new link in order and send it the history, so that it ends where the failed
        one was. On failure, the first link not ``replayed`` is the one that failed."""
        for position, link in enumerate(fresh):
            link.span = await self._open_span(link.hop)
            if link.inputs:
                history = torch.cat(link.inputs, dim=1)
                outputs = [await link.span.step(part) for part in token_chunks(history)]
                if position + 1 < len(fresh):
                    fresh[position + 1].inputs = outputs
            link.replayed = True

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            for link in self.links:
                if link.span is not None:
                    await link.span.close()
                    self._count_bytes(link.span)
                    link.span = None

    async def _abandon(self, link: _Link) -> None:
        """Drop a failed server's session without waiting on it: it may be hung."""
        if link.span is not None:
            with trio.CancelScope(shield=True):
                await link.span.framed.reset()
            self._count_bytes(link.span)
            link.span = None

    def _count_bytes(self, span: RemoteSpanSession) -> None:
        self.bytes_received += span.framed.bytes_received
        self.bytes_sent += span.framed.bytes_sent
