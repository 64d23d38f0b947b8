"""The server role: serve a span of blocks to inference sessions and answer info requests.

One inference session is one long-lived stream. Its life: an ``open`` frame
(model, fingerprint, sub-span, batch, max_length), then ``step`` frames each
answered by an ``output`` frame, then ``close`` or end of stream. Whatever goes
wrong inside one session (bad frame, bad tensor, vanished peer) ends that
session alone, returns its cache tokens, and leaves the server serving others.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from petald import __version__
from petald.kernels.dtypes import DTYPES, dtype_name
from petald.kernels.executor import DeviceExecutor
from petald.kernels.model_source import ModelIdentity
from petald.kernels.paged_kv_cache import DEFAULT_PAGE_SIZE, CacheFullError, SessionCache
from petald.kernels.span import BlockSpan
from petald.p2pnode.compute import run_step
from petald.p2pnode.framed_stream import FramedStream, PeerGone
from petald.protocol.errors import ErrorCode, ProtocolError
from petald.protocol.limits import (
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    MAX_FIRST_FRAME_BYTES,
    MAX_FRAME_BYTES,
)
from petald.protocol.messages import (
    ErrorReply,
    OpenSession,
    ServerInfo,
    SessionOpened,
    Step,
    StepOutput,
    expect_type,
)

log = logging.getLogger(__name__)


@dataclass
class ServerLimits:
    max_length: int = 8192  # longest session admitted (prompt + generated tokens)
    cache_tokens: int = 1 << 20  # KV budget, in tokens summed over blocks and batch
    page_size: int = DEFAULT_PAGE_SIZE  # tokens per KV page
    open_timeout: float = 30.0  # for the first frame of a session
    idle_timeout: float = 300.0  # between steps; an idle session is closed and freed


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

    def register(self, host: IHost) -> None:
        host.set_stream_handler(TProtocol(INFO_PROTOCOL), self._handle_info)
        host.set_stream_handler(TProtocol(INFERENCE_PROTOCOL), self._handle_inference)

    def info(self) -> ServerInfo:
        return ServerInfo(
            model_id=self.identity.model_id, fingerprint=self.identity.fingerprint,
            num_blocks=self.identity.num_blocks, start=self.span.start, end=self.span.end,
            dtype=dtype_name(self.span.dtype), quant=self.span.quant, hidden_size=self.span.hidden_size,
            max_length=self.limits.max_length, free_cache_tokens=self.pool.free_tokens,
            version=__version__,
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
        try:
            with trio.move_on_after(self.limits.open_timeout) as scope:
                msg = await framed.receive()
            if scope.cancelled_caught:
                raise ProtocolError(ErrorCode.TIMEOUT, f"no session open within {self.limits.open_timeout:.0f} s")
            if msg is None:
                return
            request = OpenSession.from_wire(msg)
            self._check_open(request)
            # Reserves pages up to max_length (or raises CacheFullError holding nothing); pages are taken as it grows.
            cache = self.pool.open(request.batch, request.max_length)
            framed.allow_frames_up_to(MAX_FRAME_BYTES)
            await framed.send(SessionOpened(request.start, request.end, request.max_length).to_wire())
            log.info("session %d from ..%s opened: blocks %d:%d, batch %d, max_length %d",
                     session_id, peer, request.start, request.end, request.batch, request.max_length)
            await self._serve_steps(framed, request, cache)
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
            if cache is not None:
                self.pool.close(cache)
            await framed.close()
            log.info("session %d closed", session_id)

    def _check_open(self, request: OpenSession) -> None:
        ident = self.identity
        # The fingerprint pins the weights; the name part of a model id may differ between copies.
        if request.fingerprint != ident.fingerprint:
            raise ProtocolError(
                ErrorCode.WRONG_MODEL,
                f"this server holds {ident.model_id} (fingerprint {ident.fingerprint[:16]}), the client asked "
                f"for {request.model_id} (fingerprint {request.fingerprint[:16]}): both must load the same weights")
        if not self.span.start <= request.start < request.end <= self.span.end:
            raise ProtocolError(
                ErrorCode.SPAN_NOT_SERVED,
                f"blocks {request.start}:{request.end} asked for; this server holds {self.span.start}:{self.span.end}")
        if request.max_length > self.limits.max_length:
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                f"max_length {request.max_length} exceeds this server's {self.limits.max_length}")

    async def _serve_steps(self, framed: FramedStream, request: OpenSession, cache: SessionCache) -> None:
        wire_dtype = DTYPES[request.wire_dtype]
        while True:
            with trio.move_on_after(self.limits.idle_timeout) as scope:
                msg = await framed.receive()
            if scope.cancelled_caught:
                raise ProtocolError(ErrorCode.TIMEOUT,
                                    f"session idle for {self.limits.idle_timeout:.0f} s; closed and freed")
            if msg is None or msg.get("type") == "close":
                return
            step = Step.from_wire(msg)
            hidden = self._check_step(step, request, cache)
            # Batched with other sessions' steps on the executor, which also copies the output to host
            # memory: on CUDA that waits for the device, and nothing may wait for the device on the event loop.
            out = await run_step(self.executor, cache, hidden, request.start, request.end, wire_dtype)
            await framed.send(StepOutput(step.step_id, out, request.wire_dtype, request.codec).to_wire())

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
        if not torch.isfinite(h).all():
            raise ProtocolError(ErrorCode.BAD_TENSOR, "hidden holds NaN or infinite values")
        return h


async def _send_error(framed: FramedStream, code: ErrorCode, message: str) -> None:
    with trio.move_on_after(5):
        try:
            await framed.send(ErrorReply(code.value, message).to_wire())
        except Exception:
            pass  # the peer may be gone; the session is being freed either way
