"""The server role: serve a span of blocks to inference sessions and answer info requests.

Training requests (``/petald/training``) are one stream each: a ``forward`` or
``backward`` frame over whole sequences, answered by one output frame; they run
on the device thread between inference steps and keep nothing afterwards.

One inference session is one long-lived stream. Its life: an ``open`` frame
(model, fingerprint, sub-span, batch, max_length), then ``step`` frames each
answered by an ``output`` frame, then ``close`` or end of stream. Whatever goes
wrong inside one session (bad frame, bad tensor, vanished peer) ends that
session alone, returns its cache tokens, and leaves the server serving others.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from petald import __version__
from petald.kernels.adapters.lora import AdapterError, LoraAdapter
from petald.kernels.deep_prompts import check_deep_prompts
from petald.kernels.dtypes import DTYPES, dtype_name
from petald.kernels.executor import DeviceExecutor
from petald.kernels.paged_kv_cache import DEFAULT_PAGE_SIZE, CacheFullError, SessionCache
from petald.kernels.sources.model_source import ModelIdentity
from petald.kernels.span import BlockSpan
from petald.kernels.training_forward import check_training_inputs, span_backward, span_forward
from petald.p2pnode.server.executor_bridge import run_step, run_task
from petald.p2pnode.server.session_inbox import PUSHED, SessionInbox, read_client
from petald.p2pnode.server.step_pusher import StepPusher
from petald.p2pnode.transport.framed_stream import FramedStream, PeerGone
from petald.protocol.errors import ErrorCode, ProtocolError
from petald.protocol.limits import (
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    MAX_FIRST_FRAME_BYTES,
    MAX_FRAME_BYTES,
    PUSH_PROTOCOL,
    TRAINING_PROTOCOL,
)
from petald.protocol.messages import (
    ErrorReply,
    OpenSession,
    PushOpen,
    ServerInfo,
    SessionOpened,
    SpanOutput,
    SpanRequest,
    Step,
    StepOutput,
    expect_type,
)
from petald.protocol.tensors import all_finite

log = logging.getLogger(__name__)


@dataclass
class ServerLimits:
    max_length: int = 8192  # longest session admitted (prompt + generated tokens)
    cache_tokens: int = 1 << 20  # KV budget, in tokens summed over blocks and batch
    page_size: int = DEFAULT_PAGE_SIZE  # tokens per KV page
    open_timeout: float = 30.0  # for the first frame of a session
    idle_timeout: float = 300.0  # between steps; an idle session is closed and freed
    step_timeout: float = 60.0  # one step's compute; a slower step ends its session (the client goes elsewhere)
    session_timeout: float = 24 * 3600.0  # a session's whole life
    max_training_tokens: int = 8192  # batch x tokens of one training request (bounds its activations' memory)
    training_slots: int = 2  # training requests read and computed at once; others wait up to open_timeout


# How long a session that ended mid-step waits for the executor to finish that step before its
# pages are freed: until then the step may still write into them.
UNFINISHED_STEP_WAIT_S = 120.0


@dataclass
class _LiveSession:
    scope: trio.CancelScope  # cancelled by the session timeout, or by a shutdown while idle
    in_step: bool = False
    unfinished: list[trio.Event] = field(default_factory=list)  # steps the executor may still be running


class BlockServer:
    def __init__(self, identity: ModelIdentity, span: BlockSpan, executor: DeviceExecutor,
                 limits: ServerLimits | None = None):
        self.identity = identity
        self.span = span
        self.executor = executor
        self.limits = limits or ServerLimits()
        self.limits.max_length = min(self.limits.max_length, span.max_positions)
        self.pool = span.new_pool(self.limits.cache_tokens, self.limits.page_size)
        self._session_ids = itertools.count(1)
        self._live: dict[int, _LiveSession] = {}
        self._push_inboxes: dict[bytes, trio.MemorySendChannel] = {}  # by push token
        self._push_streams: dict[bytes, trio.CancelScope] = {}  # the push stream feeding each token's session
        self.host: IHost | None = None  # set by register(); pushes dial from it
        # Bounds the memory of training requests (each up to a full frame plus its activations): a
        # peer opening many training streams waits for a slot instead of filling the server.
        self._training_slots = trio.CapacityLimiter(self.limits.training_slots)
        self.draining = False  # refuse new sessions (the server is leaving)
        self.closing = False  # end running sessions at their next step boundary

    @property
    def live_sessions(self) -> int:
        return len(self._live)

    def close_sessions(self) -> None:
        """End every session: idle ones now, those in a step once the step's output is sent.

        Each gets a ``shutting_down`` error, on which its client replays its history elsewhere."""
        self.draining = self.closing = True
        for live in self._live.values():
            if not live.in_step:
                live.scope.cancel()

    def register(self, host: IHost) -> None:
        self.host = host
        host.set_stream_handler(TProtocol(INFO_PROTOCOL), self._handle_info)
        host.set_stream_handler(TProtocol(PUSH_PROTOCOL), self._handle_push)
        host.set_stream_handler(TProtocol(INFERENCE_PROTOCOL), self._handle_inference)
        host.set_stream_handler(TProtocol(TRAINING_PROTOCOL), self._handle_training)

    def info(self) -> ServerInfo:
        return ServerInfo(
            model_id=self.identity.model_id, fingerprint=self.identity.fingerprint,
            num_blocks=self.identity.num_blocks, start=self.span.start, end=self.span.end,
            dtype=dtype_name(self.span.dtype), quant=self.span.quant, hidden_size=self.span.hidden_size,
            max_length=self.limits.max_length, free_cache_tokens=self.pool.free_tokens,
            version=__version__, adapters=sorted(self.span.adapters),
        )

    async def _handle_info(self, stream: INetStream) -> None:
        framed = FramedStream(stream, MAX_FIRST_FRAME_BYTES, send_timeout=self.limits.open_timeout)
        try:
            with trio.move_on_after(self.limits.open_timeout) as scope:
                msg = await framed.receive()
            if scope.cancelled_caught:
                raise ProtocolError(ErrorCode.TIMEOUT, f"no info request within {self.limits.open_timeout:.0f} s")
            if msg is not None:
                expect_type(msg, "info")
                await framed.send(self.info().to_wire())
        except ProtocolError as err:
            await _send_error(framed, err.code, err.message)
        except PeerGone:
            pass
        finally:
            await framed.close()

    async def _handle_inference(self, stream: INetStream) -> None:
        # Until a valid open arrives, a peer may only send a small frame.
        framed = FramedStream(stream, MAX_FIRST_FRAME_BYTES, send_timeout=self.limits.idle_timeout)
        session_id = next(self._session_ids)
        peer = stream.muxed_conn.peer_id.to_string()[-8:]
        cache: SessionCache | None = None
        live: _LiveSession | None = None
        inbox_in: trio.MemorySendChannel | None = None
        inbox: trio.MemoryReceiveChannel | None = None
        try:
            msg = await self._receive_first(framed, "session open")
            if msg is None:
                return
            request = OpenSession.from_wire(msg)
            self._check_open(request)
            # Reserves pages up to max_length (or raises CacheFullError holding nothing); pages are taken as it grows.
            cache = self.pool.open(request.batch, request.max_length)
            live = self._live[session_id] = _LiveSession(
                trio.CancelScope(deadline=trio.current_time() + self.limits.session_timeout))
            if request.push_token:
                if request.push_token in self._push_inboxes:
                    raise ProtocolError(ErrorCode.BAD_MESSAGE, "another session here has this push token")
                # Before "opened": a push may follow the client's first step at once.
                inbox_in, inbox = trio.open_memory_channel(0)
                self._push_inboxes[request.push_token] = inbox_in
            framed.allow_frames_up_to(MAX_FRAME_BYTES)
            await framed.send(SessionOpened(request.start, request.end, request.max_length).to_wire())
            log.info("session %d from ..%s opened: blocks %d:%d, batch %d, max_length %d",
                     session_id, peer, request.start, request.end, request.batch, request.max_length)
            with live.scope:
                await self._serve_session(SessionInbox(framed, inbox), request, cache, live, inbox_in)
            if live.scope.cancelled_caught:
                raise (self._shutting_down() if self.closing else ProtocolError(
                    ErrorCode.TIMEOUT, f"session open for longer than {self.limits.session_timeout:.0f} s; "
                                       "closed and freed"))
        except ProtocolError as err:
            log.info("session %d from ..%s refused: %s", session_id, peer, err)
            await _send_error(framed, err.code, err.message)
        except CacheFullError as err:
            await _send_error(framed, ErrorCode.CACHE_FULL, str(err))
        except PeerGone as err:
            log.info("session %d from ..%s: peer gone (%s)", session_id, peer, err)
        except Exception:  # a bug must cost one session, never the server
            log.exception("session %d failed", session_id)
            # No exception text to the peer: it can carry paths and internals of this machine.
            await _send_error(framed, ErrorCode.INTERNAL, f"internal server error in session {session_id}; "
                                                          "the server logged the details")
        finally:
            self._live.pop(session_id, None)
            if inbox_in is not None:
                self._push_inboxes.pop(request.push_token, None)
                inbox_in.close()
                inbox.close()  # a push handler still offering a step gets BrokenResourceError, not a wait
            if cache is not None:
                await self._free_after_steps(cache, live, session_id)
            await framed.close()
            log.info("session %d closed", session_id)

    async def _receive_first(self, framed: FramedStream, what: str) -> dict[str, Any] | None:
        """A stream's first message (None: the peer closed it); a peer silent for ``open_timeout`` gets ``timeout``."""
        with trio.move_on_after(self.limits.open_timeout):
            return await framed.receive()
        raise ProtocolError(ErrorCode.TIMEOUT, f"no {what} within {self.limits.open_timeout:.0f} s")

    async def _handle_training(self, stream: INetStream) -> None:
        """One forward or backward request over whole sequences; nothing outlives the stream."""
        framed = FramedStream(stream, MAX_FIRST_FRAME_BYTES, send_timeout=self.limits.step_timeout)
        peer = stream.muxed_conn.peer_id.to_string()[-8:]
        try:
            with trio.move_on_after(self.limits.open_timeout) as slot_scope:
                await self._training_slots.acquire()
            if slot_scope.cancelled_caught:
                raise ProtocolError(ErrorCode.BUSY, f"every training slot stayed taken for "
                                                    f"{self.limits.open_timeout:.0f} s; try another server or later")
            try:
                await self._serve_training_request(framed)
            finally:
                self._training_slots.release()
        except ProtocolError as err:
            log.info("training request from ..%s refused: %s", peer, err)
            await _send_error(framed, err.code, err.message)
        except PeerGone as err:
            log.info("training request from ..%s: peer gone (%s)", peer, err)
        except Exception:  # a bug must cost one request, never the server
            log.exception("training request from ..%s failed", peer)
            await _send_error(framed, ErrorCode.INTERNAL, "internal server error in a training request; "
                                                          "the server logged the details")
        finally:
            await framed.close()

    async def _serve_training_request(self, framed: FramedStream) -> None:
        framed.allow_frames_up_to(MAX_FRAME_BYTES)  # a training request carries its tensors in its first frame
        msg = await self._receive_first(framed, "request")
        if msg is None:
            return
        request = SpanRequest.from_wire(msg)
        compute = self._training_job(request)
        with trio.move_on_after(self.limits.step_timeout) as step_scope:
            # On the device thread, between inference steps. A cancelled wait abandons the result
            # (and the job, if it has not started); the job holds nothing another request needs.
            tensor, grad_prompts = await run_task(self.executor, compute)
        if step_scope.cancelled_caught:
            raise ProtocolError(ErrorCode.TIMEOUT, f"the {'backward' if request.backward else 'forward'} "
                                                   f"took longer than {self.limits.step_timeout:.0f} s")
        await framed.send(SpanOutput(tensor, grad_prompts, request.backward, request.wire_dtype,
                                     request.codec).to_wire())

    def _training_job(self, request: SpanRequest):
        """Check ``request`` against this server and return the computation it asks for."""
        if self.draining:
            raise self._shutting_down()
        self._check_model(request.fingerprint, request.model_id, request.start, request.end)
        adapter = self._adapter(request.adapter)
        tensors = {"hidden": request.hidden, "grad_output": request.grad_output, "prompts": request.prompts}
        for name, tensor in tensors.items():
            if tensor is None:
                continue
            if dtype_name(tensor.dtype) != request.wire_dtype:
                raise ProtocolError(ErrorCode.BAD_TENSOR, f"{name} is {dtype_name(tensor.dtype)}; the request "
                                                          f"says {request.wire_dtype}")
            if not torch.isfinite(tensor).all():
                raise ProtocolError(ErrorCode.BAD_TENSOR, f"{name} holds NaN or infinite values")
        h = request.hidden
        try:
            check_training_inputs(self.span, h, request.start, request.end, request.prompts)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_TENSOR, str(exc)) from None
        if request.grad_output is not None and request.grad_output.shape != h.shape:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"grad_output has shape {list(request.grad_output.shape)}; "
                                                      f"hidden has {list(h.shape)}")
        if h.shape[0] * h.shape[1] > self.limits.max_training_tokens:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f"{h.shape[0]} x {h.shape[1]} tokens exceed this server's "
                                f"{self.limits.max_training_tokens} per training request: send smaller chunks")
        span, start, end, prompts = self.span, request.start, request.end, request.prompts
        if request.grad_output is None:
            def forward():
                with torch.no_grad():
                    return span_forward(span, h, start, end, prompts, adapter).to("cpu", torch.float32), None
            return forward
        grad = request.grad_output
        return lambda: span_backward(span, h, grad, start, end, prompts, adapter)

    def _adapter(self, name: str) -> LoraAdapter | None:
        try:
            return self.span.adapter_named(name)
        except AdapterError as exc:
            raise ProtocolError(ErrorCode.UNKNOWN_ADAPTER, str(exc)) from None

    async def _free_after_steps(self, cache: SessionCache, live: _LiveSession | None, session_id: int) -> None:
        """Return the session's pages once no step of it can still write into them."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(UNFINISHED_STEP_WAIT_S):
                for finished in live.unfinished if live is not None else []:
                    await finished.wait()
        if live is not None and not all(finished.is_set() for finished in live.unfinished):
            # Freeing now could hand pages being written to another session: keep them instead.
            log.error("session %d: a step did not finish within %.0f s; its %d KV pages stay reserved",
                      session_id, UNFINISHED_STEP_WAIT_S, cache.reserved_pages)
            return
        self.pool.close(cache)

    def _shutting_down(self) -> ProtocolError:
        return ProtocolError(ErrorCode.SHUTTING_DOWN, "this server is shutting down; continue on another server")

    def _check_open(self, request: OpenSession) -> None:
        if self.draining:
            raise self._shutting_down()
        self._check_model(request.fingerprint, request.model_id, request.start, request.end)
        self._adapter(request.adapter)
        if request.max_length > self.limits.max_length:
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                f"max_length {request.max_length} exceeds this server's {self.limits.max_length}")

    def _check_model(self, fingerprint: str, model_id: str, start: int, end: int) -> None:
        ident = self.identity
        # The fingerprint pins the weights; the name part of a model id may differ between copies.
        if fingerprint != ident.fingerprint:
            raise ProtocolError(
                ErrorCode.WRONG_MODEL,
                f"this server holds {ident.model_id} (fingerprint {ident.fingerprint[:16]}), the client asked "
                f"for {model_id} (fingerprint {fingerprint[:16]}): both must load the same weights")
        if not self.span.start <= start < end <= self.span.end:
            raise ProtocolError(
                ErrorCode.SPAN_NOT_SERVED,
                f"blocks {start}:{end} asked for; this server holds {self.span.start}:{self.span.end}")

    async def _serve_session(self, inbox: SessionInbox, request: OpenSession, cache: SessionCache,
                             live: _LiveSession, inbox_in: trio.MemorySendChannel | None) -> None:
        """Serve the session's steps: with an inbox channel (``inbox_in`` its sending side), also steps
        pushed to it; with a host, push outputs on where steps ask. Errors are raised as themselves."""
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            pusher = StepPusher(self.host, nursery, self.limits.open_timeout) if self.host is not None else None
            if inbox_in is not None:
                nursery.start_soon(read_client, inbox.framed, inbox_in.clone())
            try:
                await self._serve_steps(inbox, pusher, request, cache, live)
            except Exception as exc:  # raised after the nursery, so not wrapped in an exception group
                failure = exc
            finally:
                if pusher is not None:
                    with trio.CancelScope(shield=True):
                        await pusher.close()
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _serve_steps(self, inbox: SessionInbox, pusher: StepPusher | None, request: OpenSession,
                           cache: SessionCache, live: _LiveSession) -> None:
        wire_dtype = DTYPES[request.wire_dtype]
        step_timeout = self.limits.step_timeout
        framed = inbox.framed
        while True:
            if self.closing:
                raise self._shutting_down()
            with trio.move_on_after(self.limits.idle_timeout) as scope:
                kind, msg = await inbox.next()
            if scope.cancelled_caught:
                raise ProtocolError(ErrorCode.TIMEOUT,
                                    f"session idle for {self.limits.idle_timeout:.0f} s; closed and freed")
            if kind == PUSHED:
                step, prompts = msg, None
                if step.position != cache.length:
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
                inbox.ran_pushed(step)
            else:
                if msg is None or msg.get("type") == "close":
                    return
                step = Step.from_wire(msg)
                if inbox.already_ran(step):
                    continue  # answered when the push ran it
                hidden = self._check_step(step, request, cache)
                prompts = self._check_prompts(step, request)
            # Batched with other sessions' steps on the executor, which also copies the output to host
            # memory: on CUDA that waits for the device, and nothing may wait for the device on the event loop.
            finished = trio.Event()
            live.unfinished = [finished]  # the previous step had finished before this one was accepted
            live.in_step = True
            with trio.move_on_after(step_timeout) as step_scope:
                out = await run_step(self.executor, cache, hidden, request.start, request.end, wire_dtype, finished,
                                     prompts, request.adapter)
            if step_scope.cancelled_caught:
                raise ProtocolError(ErrorCode.TIMEOUT, f"the step took longer than {step_timeout:.0f} s; "
                                                       "session closed")
            # The next server first: its compute starts while the client still reads this reply.
            pushed = False
            if step.push and pusher is not None:
                pushed = await pusher.push(step.push, step.position, out, request.wire_dtype, request.codec)
            await framed.send(StepOutput(step.step_id, out, request.wire_dtype, request.codec, pushed).to_wire())
            live.in_step = False

    async def _handle_push(self, stream: INetStream) -> None:
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
                msg = await self._receive_first(framed, "push open")
                if msg is None:
                    clean_end = True
                    return
                token = PushOpen.from_wire(msg).token
                if token not in self._push_inboxes:
                    raise ProtocolError(ErrorCode.BAD_STATE, "no session here takes pushes with this token")
                inbox = self._push_inboxes[token].clone()
                if token in self._push_streams:
                    self._push_streams[token].cancel()
                self._push_streams[token] = scope
                framed.allow_frames_up_to(MAX_FRAME_BYTES)
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
            await _send_error(framed, err.code, err.message)
            clean_end = True  # the error frame must reach the sender, which a reset could drop
        except (PeerGone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the pusher went away or moved on, or the session ended: nothing was wrong here
        except Exception:  # a bug must cost one push stream, never the server
            log.exception("push stream from ..%s failed", peer)
        finally:
            if self._push_streams.get(token) is scope:
                del self._push_streams[token]
            if inbox is not None:
                inbox.close()
            if clean_end:
                await framed.close()
            else:  # the sender's next push fails at once instead of going nowhere
                await framed.reset()

    def _check_step(self, step: Step, request: OpenSession, cache: SessionCache) -> torch.Tensor:
        h = step.hidden
        expected = f"[{request.batch}, tokens, {self.span.hidden_size}]"
        if h.dim() != 3 or h.shape[0] != request.batch or h.shape[2] != self.span.hidden_size or h.shape[1] < 1:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"hidden has shape {list(h.shape)}; expected {expected}")
        if dtype_name(h.dtype) != request.wire_dtype:
            raise ProtocolError(ErrorCode.BAD_TENSOR,
                                f"hidden is {dtype_name(h.dtype)}; this session was opened for {request.wire_dtype}")
        if step.position != cache.length:
            raise ProtocolError(ErrorCode.BAD_STATE,
                                f"step at position {step.position}, but the session is at position {cache.length}")
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
            check_deep_prompts(p, request.end - request.start, request.batch, self.span.hidden_size,
                               step.hidden.shape[1])
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_TENSOR, str(exc)) from None
        if dtype_name(p.dtype) != request.wire_dtype:
            raise ProtocolError(ErrorCode.BAD_TENSOR,
                                f"prompts are {dtype_name(p.dtype)}; this session was opened for {request.wire_dtype}")
        if not all_finite(p):
            raise ProtocolError(ErrorCode.BAD_TENSOR, "prompts hold NaN or infinite values")
        return p


async def _send_error(framed: FramedStream, code: ErrorCode, message: str) -> None:
    with trio.move_on_after(5):
        try:
            await framed.send(ErrorReply(code.value, message).to_wire())
        except Exception:
            pass  # the peer may be gone; the session is being freed either way
