"""Inference sessions (``/petald/inference``): one long-lived stream each.

A session's life: an ``open`` frame (model, fingerprint, sub-span, batch, max_length), then
``step`` frames each answered by an ``output`` frame, then ``close`` or end of stream. Whatever
goes wrong inside one session (bad frame, bad tensor, vanished peer) ends that session alone,
returns its cache tokens, and leaves the server serving others. A session opened with a push
token also runs the steps the previous hop's server pushes to it (``push_handler.py``), and a
step may ask this server to push its output on (``step_pusher.py``).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import trio
from libp2p.abc import INetStream

from petald.kernels.deep_prompts import check_deep_prompts
from petald.kernels.paged_kv_cache import CacheFullError, SessionCache
from petald.p2pnode.server.executor_bridge import StepInFlight, run_step
from petald.p2pnode.server.session_inbox import PUSHED, SessionInbox, read_client
from petald.p2pnode.server.step_pusher import StepPusher
from petald.p2pnode.server.stream_frames import receive_first, send_error
from petald.p2pnode.transport.first_failure import open_first_failure_nursery
from petald.p2pnode.transport.framed_stream import FramedStream, PeerGone
from petald.protocol.errors import ErrorCode, ProtocolError
from petald.protocol.limits import MAX_FIRST_FRAME_BYTES, session_frame_bytes
from petald.protocol.messages import OpenSession, SessionOpened, Step, StepOutput
from petald.protocol.tensors import all_finite

if TYPE_CHECKING:
    from petald.p2pnode.server.block_server import BlockServer

log = logging.getLogger(__name__)

# A step's output as the executor hands it over: the session's wire format then encodes it, choosing
# per tensor (float16 or bfloat16, int8 scales) from the full-precision values.
OUTPUT_DTYPE = torch.float32


@dataclass
class _LiveSession:
    scope: trio.CancelScope  # cancelled by the session timeout, or by a shutdown while idle
    in_step: bool = False
    step: StepInFlight | None = None  # the last step handed to the executor


class InferenceSessions:
    def __init__(self, server: BlockServer):
        self.server = server
        self._ids = itertools.count(1)
        self._live: dict[int, _LiveSession] = {}

    @property
    def live(self) -> int:
        return len(self._live)

    def end_idle(self) -> None:
        """End the sessions waiting for their next step now; those in a step end at its end
        (``BlockServer.closing``)."""
        for live in self._live.values():
            if not live.in_step:
                live.scope.cancel()

    async def handle(self, stream: INetStream) -> None:
        server, limits = self.server, self.server.limits
        # Until a valid open arrives, a peer may only send a small frame.
        framed = FramedStream(stream, MAX_FIRST_FRAME_BYTES, send_timeout=limits.idle_timeout)
        session_id = next(self._ids)
        peer_id = stream.muxed_conn.peer_id.to_base58()
        peer = peer_id[-8:]
        cache: SessionCache | None = None
        counted = 0  # KV pages counted against the peer's share
        live: _LiveSession | None = None
        inbox_in: trio.MemorySendChannel | None = None
        inbox: trio.MemoryReceiveChannel | None = None
        try:
            msg = await receive_first(framed, limits.open_timeout, "session open")
            if msg is None:
                return
            request = OpenSession.from_wire(msg)
            self._check_open(request)
            pages = server.pool.pages_for_tokens(request.batch, request.max_length, server.pool.page_size)
            if pages <= server.pool.num_pages:  # a larger one the pool refuses below (too_large), as ever
                server.peers.open_session(peer_id, pages)  # or refused: busy, quota
                counted = pages
            # Reserves pages up to max_length (or raises CacheFullError holding nothing); pages are taken as it grows.
            cache = server.pool.open(request.batch, request.max_length)
            live = self._live[session_id] = _LiveSession(
                trio.CancelScope(deadline=trio.current_time() + limits.session_timeout))
            if request.push_token:
                # Before "opened": a push may follow the client's first step at once.
                inbox_in, inbox = server.pushes.open(request.push_token)
            framed.allow_frames_up_to(session_frame_bytes(request.batch, request.max_length, server.span.hidden_size,
                                                          request.end - request.start), server.frame_budget)
            await framed.send(SessionOpened(request.start, request.end, request.max_length).to_wire())
            server.metrics.sessions.inc()
            log.info("session %d from ..%s opened: blocks %d:%d, batch %d, max_length %d",
                     session_id, peer, request.start, request.end, request.batch, request.max_length)
            with live.scope:
                await self._serve_session(SessionInbox(framed, inbox), request, cache, live, inbox_in, peer_id)
            if live.scope.cancelled_caught:
                raise (server.shutting_down() if server.closing else ProtocolError(
                    ErrorCode.TIMEOUT, f"session open for longer than {limits.session_timeout:.0f} s; "
                                       "closed and freed"))
        except ProtocolError as err:
            log.info("session %d from ..%s refused: %s", session_id, peer, err)
            server.metrics.refusals.labels(err.code.value).inc()
            await send_error(framed, err.code, err.message)
        except CacheFullError as err:
            # Over the whole budget, the session can never be admitted here: the client must not wait for room.
            pool = server.pool
            never = pool.pages_for_tokens(request.batch, request.max_length, pool.page_size) > pool.num_pages
            code = ErrorCode.TOO_LARGE if never else ErrorCode.CACHE_FULL
            server.metrics.refusals.labels(code.value).inc()
            await send_error(framed, code, str(err))
        except PeerGone as err:
            log.info("session %d from ..%s: peer gone (%s)", session_id, peer, err)
        except Exception:  # a bug must cost one session, never the server
            log.exception("session %d failed", session_id)
            # No exception text to the peer: it can carry paths and internals of this machine.
            await send_error(framed, ErrorCode.INTERNAL, f"internal server error in session {session_id}; "
                                                         "the server logged the details")
        finally:
            self._live.pop(session_id, None)
            if counted:
                server.peers.close_session(peer_id, counted)
            if inbox_in is not None and inbox is not None:
                server.pushes.close(request.push_token, inbox_in, inbox)
            if cache is not None:
                self._free_after_steps(cache, live, session_id)
            await framed.close()
            server.metrics.count_wire(framed.bytes_received, framed.bytes_sent)
            log.info("session %d closed", session_id)

    def _free_after_steps(self, cache: SessionCache, live: _LiveSession | None, session_id: int) -> None:
        """Return the session's pages once no step of it can still write into them: now, or, for a
        step still on the executor (its wait timed out, its peer left), when the executor drops it
        at its next chunk (``StepInFlight``). Freeing earlier could hand pages being written to
        another session; never freeing them was hole 1 of issue 22 (docs/security.md)."""
        pool = self.server.pool
        step = live.step if live is not None else None
        if step is not None and step.running:
            log.info("session %d ended with a step on the executor: it is dropped at its next chunk, "
                     "then its %d KV pages are freed", session_id, cache.reserved_pages)
            step.cancel()
        (step or StepInFlight()).when_ended(lambda: pool.close(cache))

    def _check_open(self, request: OpenSession) -> None:
        server = self.server
        if server.draining:
            raise server.shutting_down()
        server.check_model(request.fingerprint, request.model_id, request.start, request.end)
        server.adapter(request.adapter)
        if request.max_length > server.limits.max_length:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f"max_length {request.max_length} exceeds this server's {server.limits.max_length}")

    async def _serve_session(self, inbox: SessionInbox, request: OpenSession, cache: SessionCache,
                             live: _LiveSession, inbox_in: trio.MemorySendChannel | None, peer_id: str) -> None:
        """Serve the session's steps: with an inbox channel (``inbox_in`` its sending side), also steps
        pushed to it; with a host, push outputs on where steps ask. Errors are raised as themselves."""
        host = self.server.host
        async with open_first_failure_nursery() as nursery:
            pusher = StepPusher(host, nursery, self.server.limits.open_timeout) if host is not None else None
            if inbox_in is not None:
                nursery.start_soon(read_client, inbox.framed, inbox_in.clone())
            try:
                await self._serve_steps(inbox, pusher, request, cache, live, peer_id)
            finally:
                if pusher is not None:
                    with trio.CancelScope(shield=True):
                        await pusher.close()
                nursery.cancel_scope.cancel()

    async def _serve_steps(self, inbox: SessionInbox, pusher: StepPusher | None, request: OpenSession,
                           cache: SessionCache, live: _LiveSession, peer_id: str) -> None:
        server, limits = self.server, self.server.limits
        framed = inbox.framed
        paid_bytes = framed.bytes_received
        fault = server.faults.for_session() if server.faults is not None else None  # test-only
        while True:
            if server.closing:
                raise server.shutting_down()
            with trio.move_on_after(limits.idle_timeout) as scope:
                kind, msg = await inbox.next()
            received = time.perf_counter()  # the step is here whole: what the server holds it for starts
            if scope.cancelled_caught:
                raise ProtocolError(ErrorCode.TIMEOUT,
                                    f"session idle for {limits.idle_timeout:.0f} s; closed and freed")
            if kind == PUSHED:
                step, prompts = msg, None
                if inbox.already_ran(step) or step.position > cache.length:
                    continue  # a head start that lost the race to the client's own copy
                # A bad push is dropped, not fatal: the pusher is at fault, not this session, whose
                # client sends the step itself once the answer is late.
                if step.prompts is not None:
                    log.warning("dropped a step pushed to a session: it carries deep prompts")
                    continue
                try:
                    hidden = self._check_step(step, request, cache)
                except ProtocolError as err:
                    log.warning("dropped a step pushed to a session: %s", err.message)
                    continue
            else:
                if msg is None or msg.get("type") == "close":
                    return
                step = Step.from_wire(msg)
                if inbox.already_ran(step):
                    continue  # answered when the push ran it
                hidden = self._check_step(step, request, cache)
                prompts = self._check_prompts(step, request)
            inbox.ran(step)
            if step.position < cache.length:  # a rollback: the client kept fewer tokens than it sent
                server.pool.truncate(cache, step.position)
            # Within the peer's steps and bytes per second (a pushed step counts for the session's peer too).
            await server.peers.pace_step(peer_id, hidden.shape[1], framed.bytes_received - paid_bytes)
            paid_bytes = framed.bytes_received
            # Batched with other sessions' steps on the executor, which also copies the output to host
            # memory: on CUDA that waits for the device, and nothing may wait for the device on the event loop.
            live.step = StepInFlight()  # the previous step had ended before this one was accepted
            live.in_step = True
            with trio.move_on_after(limits.step_timeout) as step_scope:
                out = await run_step(server.executor, cache, hidden, request.start, request.end, OUTPUT_DTYPE,
                                     live.step, prompts, request.adapter)
            if step_scope.cancelled_caught:
                raise ProtocolError(ErrorCode.TIMEOUT, f"the step took longer than {limits.step_timeout:.0f} s; "
                                                       "session closed")
            # The next server first: its compute starts while the client still reads this reply.
            pushed = False
            if step.push and pusher is not None:
                pushed = await pusher.push(step.push, step.position, out, request.wire)
            # Up to the answer's encoding (a few milliseconds at most), which the client counts as transfer.
            held_ms = (time.perf_counter() - received) * 1000
            server.metrics.steps.inc()
            server.metrics.step_seconds.observe(held_ms / 1000)
            reply = StepOutput(step.step_id, out, request.wire, pushed, held_ms).to_wire()
            faulty = fault.frame(reply, out) if fault is not None else None
            await (framed.send_frame(faulty) if faulty is not None else framed.send(reply))
            live.in_step = False

    def _check_step(self, step: Step, request: OpenSession, cache: SessionCache) -> torch.Tensor:
        h = step.hidden
        hidden_size = self.server.span.hidden_size
        expected = f"[{request.batch}, tokens, {hidden_size}]"
        if h.dim() != 3 or h.shape[0] != request.batch or h.shape[2] != hidden_size or h.shape[1] < 1:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"hidden has shape {list(h.shape)}; expected {expected}")
        if step.position > cache.length:  # earlier is a rollback (docs/protocol.md)
            raise ProtocolError(ErrorCode.BAD_STATE,
                                f"step at position {step.position}, beyond the session's end at {cache.length}")
        if step.position + h.shape[1] > request.max_length:
            raise ProtocolError(ErrorCode.BAD_STATE,
                                f"step reaches position {step.position + h.shape[1]}, beyond max_length {request.max_length}")
        if not all_finite(h):
            raise ProtocolError(ErrorCode.BAD_TENSOR, "hidden holds NaN or infinite values")
        return h

    def _check_prompts(self, step: Step, request: OpenSession) -> torch.Tensor | None:
        p = step.prompts
        if p is None:
            return None
        try:
            check_deep_prompts(p, request.end - request.start, request.batch, self.server.span.hidden_size,
                               step.hidden.shape[1])
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_TENSOR, str(exc)) from None
        if not all_finite(p):
            raise ProtocolError(ErrorCode.BAD_TENSOR, "prompts hold NaN or infinite values")
        # Each tensor's 16-bit dtype was chosen by its own range: the prompts are added in the hidden's.
        return p.to(step.hidden.dtype)
