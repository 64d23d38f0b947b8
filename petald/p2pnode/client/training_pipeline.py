"""Forward and backward of a batch through remote blocks, for training: chunked, routed for
throughput, and retried from the span that failed.

A batch is cut into chunks of whole sequences (``max_chunk_tokens`` tokens at most). Each chunk
gets its own route, planned for throughput, with the work of the chunks routed before it counted
against their servers, so that chunks run in parallel on different replicas. The forward keeps
each hop's input (the trace); the backward sends it again with the gradient, hop by hop in
reverse, and the server recomputes its forward (it keeps nothing between requests).

When a server fails, it is banned and only the blocks it had are routed again: a forward carries
on from the failed hop's input; a backward re-runs the forward through the new servers of that
hop's blocks (when they split them) to get their inputs, then their backwards. Whatever servers
answer, the arithmetic is the same, so a failure never changes a gradient beyond float tolerance.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch
from libp2p.abc import IHost

from petald.kernels.sources.model_source import ModelIdentity
from petald.p2pnode.client.client_options import ClientOptions
from petald.p2pnode.client.failover import SERVER_FAILURES, Failover, HopFailed, Recovery
from petald.p2pnode.client.remote_training import remote_span_pass
from petald.p2pnode.routing.bans import ServerBans
from petald.p2pnode.routing.route import SpanHop, SpanRoute
from petald.p2pnode.transport.first_failure import open_first_failure_nursery
from petald.protocol.errors import RemoteError
from petald.protocol.limits import MAX_FRAME_BYTES, MAX_TENSOR_BYTES

log = logging.getLogger(__name__)

FRAME_SLACK_BYTES = 64 * 1024  # a request's fields beside its tensors, and msgpack's framing

# ``find_route(start, end, deadline, tokens, busy)``: a throughput route for a chunk of ``tokens``
# tokens over blocks [start, end) avoiding banned servers, waiting for one until ``deadline``.
TrainingRouteFinder = Callable[[int, int, float, int, dict[str, float]], Awaitable[SpanRoute]]

# Error codes that say the request itself is wrong: every server would answer the same.
_CALLER_ERRORS = ("bad_tensor", "bad_message")


@dataclass
class HopTrace:
    """One hop of one chunk's forward: the blocks, who ran them, and their input."""

    hop: SpanHop
    inputs: torch.Tensor


@dataclass
class ChunkTrace:
    rows: slice
    hops: list[HopTrace]


@dataclass
class ForwardTrace:
    """What a batch's backward needs from its forward."""

    start: int
    end: int
    chunks: list[ChunkTrace]


def chunk_rows(batch: int, tokens: int, hidden_size: int, max_chunk_tokens: int,
               prompts: torch.Tensor | None = None) -> list[slice]:
    """Whole sequences per chunk: at most ``max_chunk_tokens`` tokens, and small enough that a backward
    request (float32 ``hidden`` and ``grad_output``, plus the deep ``prompts`` of the widest hop) fits
    in one frame, each tensor within the tensor limit."""
    row = tokens * hidden_size * 4
    shared = per_row = 0
    if prompts is not None:  # [blocks, 1 or batch, P, hidden]: a hop sends at most all the blocks
        prompt_row = prompts.shape[0] * prompts.shape[2] * prompts.shape[3] * 4
        shared, per_row = (prompt_row, 0) if prompts.shape[1] == 1 else (0, prompt_row)
    room = MAX_FRAME_BYTES - FRAME_SLACK_BYTES - shared
    by_frame = room // (2 * row + per_row) if room > 0 else 0
    by_tensor = min(MAX_TENSOR_BYTES // row, MAX_TENSOR_BYTES // per_row if per_row else batch)
    rows = min(max(1, max_chunk_tokens // tokens), by_frame, by_tensor)
    if rows < 1:
        raise ValueError(f"one sequence of {tokens} tokens (with its deep prompts) does not fit in one "
                         f"{MAX_FRAME_BYTES}-byte training request: use shorter sequences or fewer prompt tokens")
    return [slice(r, min(r + rows, batch)) for r in range(0, batch, rows)]


async def _run_all(jobs: list[Callable[[], Awaitable[None]]]) -> None:
    """Run ``jobs`` concurrently; the first failure cancels the others and is raised as itself,
    so callers can catch NoRouteError and the like."""
    async with open_first_failure_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(job)


def _prompt_rows(prompts: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """The chunk's deep prompts: shared ones ([blocks, 1, P, H]) whole, per-row ones sliced."""
    if prompts is None or prompts.shape[1] == 1:
        return prompts
    return prompts[:, rows]


class TrainingPipeline:
    def __init__(self, host: IHost, identity: ModelIdentity, find_route: TrainingRouteFinder, bans: ServerBans,
                 options: ClientOptions, recoveries: list[Recovery] | None = None):
        """``options``: the wire, the timeouts, the adapter and the chunk size.
        Every server replaced is recorded in ``recoveries``."""
        self.host, self.identity, self.find_route, self.bans = host, identity, find_route, bans
        self.options = options
        self.recoveries: list[Recovery] = [] if recoveries is None else recoveries
        self.failover = Failover(bans, options.recovery_timeout, self.recoveries, work="a training pass")

    async def forward(self, hidden: torch.Tensor, prompts: torch.Tensor | None, start: int, end: int
                      ) -> tuple[torch.Tensor, ForwardTrace]:
        """``hidden`` [B, T, H] through blocks [start, end), with deep ``prompts`` [end - start, 1 or B, P, H]."""
        rows = chunk_rows(hidden.shape[0], hidden.shape[1], hidden.shape[2], self.options.max_chunk_tokens,
                          prompts)
        busy: dict[str, float] = {}
        routes = []
        deadline = self.failover.deadline()
        for r in rows:
            tokens = (r.stop - r.start) * hidden.shape[1]
            route = await self.find_route(start, end, deadline, tokens, busy)
            for hop in route.hops:  # the next chunks see this one's work on these servers
                busy[hop.server.peer_id] = busy.get(hop.server.peer_id, 0.0) + hop.server.hop_cost(
                    hop.end - hop.start, tokens)
            routes.append(route)
        outputs: list[torch.Tensor | None] = [None] * len(rows)
        traces: list[ChunkTrace | None] = [None] * len(rows)

        async def run(index: int) -> None:
            r = rows[index]
            outputs[index], hops = await self._forward_chunk(hidden[r], _prompt_rows(prompts, r), start, end,
                                                              list(routes[index].hops))
            traces[index] = ChunkTrace(r, hops)

        await _run_all([lambda i=index: run(i) for index in range(len(rows))])
        return torch.cat(outputs, dim=0), ForwardTrace(start, end, traces)  # type: ignore[arg-type]

    async def backward(self, trace: ForwardTrace, grad_output: torch.Tensor, prompts: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of the forward's ``hidden`` and ``prompts`` given the gradient of its output."""
        grads: list[torch.Tensor | None] = [None] * len(trace.chunks)
        prompt_grads: list[torch.Tensor | None] = [None] * len(trace.chunks)

        async def run(index: int) -> None:
            chunk = trace.chunks[index]
            grads[index], prompt_grads[index] = await self._backward_chunk(
                chunk, grad_output[chunk.rows], _prompt_rows(prompts, chunk.rows), trace.start)

        await _run_all([lambda i=index: run(i) for index in range(len(trace.chunks))])
        grad_hidden = torch.cat(grads, dim=0)  # type: ignore[arg-type]
        if prompts is None:
            return grad_hidden, None
        if prompts.shape[1] == 1:  # shared by every row: the chunks' gradients add up
            return grad_hidden, torch.stack(prompt_grads).sum(0)  # type: ignore[arg-type]
        return grad_hidden, torch.cat(prompt_grads, dim=1)  # type: ignore[arg-type]

    # --- one chunk -----------------------------------------------------------------------------

    async def _pass(self, hop: SpanHop, hidden: torch.Tensor, prompts: torch.Tensor | None, offset: int,
                    grad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        hop_prompts = prompts[hop.start - offset : hop.end - offset] if prompts is not None else None
        # A slow but healthy server must not be taken for a hung one: allow for the work announced.
        server, tokens = hop.server, hidden.shape[0] * hidden.shape[1]
        expected = server.hop_cost(hop.end - hop.start, tokens) if server.forward_tps > 0 else 0.0
        try:
            result = await remote_span_pass(self.host, hop, self.identity, hidden, hop_prompts, grad,
                                            self.options, self.options.step_timeout + 4 * expected)
        except SERVER_FAILURES as exc:
            raise HopFailed(hop, exc) from None
        self.bans.forgive(hop.server.peer_id)  # only a computed pass clears a server
        return result

    async def _forward_chunk(self, hidden: torch.Tensor, prompts: torch.Tensor | None, start: int, end: int,
                             hops: list[SpanHop]) -> tuple[torch.Tensor, list[HopTrace]]:
        trace: list[HopTrace] = []
        deadline: float | None = None
        x, position = hidden, start
        while position < end:
            hop = hops[0]
            try:
                out, _ = await self._pass(hop, x, prompts, start)
            except HopFailed as failed:
                deadline = self.failover.deadline() if deadline is None else deadline
                hops = list((await self._reroute(failed, position, end, deadline, x)).hops)
                continue
            trace.append(HopTrace(hop, x))
            x, position = out, hop.end
            hops.pop(0)
            deadline = None  # a later failure gets its own recovery time
        return x, trace

    async def _backward_chunk(self, chunk: ChunkTrace, grad: torch.Tensor, prompts: torch.Tensor | None,
                              offset: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        prompt_grads: list[torch.Tensor] = []
        for step in reversed(chunk.hops):
            grad, hop_prompt_grad = await self._backward_hop(step, grad, prompts, offset)
            if hop_prompt_grad is not None:
                prompt_grads.append(hop_prompt_grad)
        if prompts is None:
            return grad, None
        return grad, torch.cat(list(reversed(prompt_grads)), dim=0)

    async def _backward_hop(self, step: HopTrace, grad_output: torch.Tensor, prompts: torch.Tensor | None,
                            offset: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The backward of one hop of the forward; if its server fails, through whoever holds its blocks now."""
        hops, deadline = [step.hop], None
        while True:
            try:
                inputs = [step.inputs]
                for hop in hops[:-1]:  # a replacement split the blocks: each part needs its own input
                    inputs.append((await self._pass(hop, inputs[-1], prompts, offset))[0])
                grad, prompt_grads = grad_output, []
                for hop, x in zip(reversed(hops), reversed(inputs), strict=True):
                    grad, prompt_grad = await self._pass(hop, x, prompts, offset, grad)
                    if prompt_grad is not None:
                        prompt_grads.insert(0, prompt_grad)
                return grad, (torch.cat(prompt_grads, dim=0) if prompt_grads else None)
            except HopFailed as failed:
                deadline = self.failover.deadline() if deadline is None else deadline
                hops = list((await self._reroute(failed, step.hop.start, step.hop.end, deadline, step.inputs)).hops)

    async def _reroute(self, failed: HopFailed, start: int, end: int, deadline: float,
                       inputs: torch.Tensor) -> SpanRoute:
        """Ban the failed server and route blocks [start, end) anew, waiting until ``deadline``."""
        exc = failed.failure
        if isinstance(exc, RemoteError) and exc.code in _CALLER_ERRORS:
            raise exc  # the request is at fault, not the server: every server would refuse it
        tokens = inputs.shape[0] * inputs.shape[1]

        async def find_route(start: int, end: int, deadline: float) -> SpanRoute:
            return await self.find_route(start, end, deadline, tokens, {})

        route = await self.failover.reroute(failed, start, end, deadline, find_route)
        log.warning("blocks %d:%d re-routed to %s", start, end, route.describe())
        return route
