"""Training requests (``/petald/training``): one stream each, a ``forward`` or ``backward`` frame
over whole sequences answered by one output frame. They run on the device thread between
inference steps and keep nothing afterwards."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import trio
from libp2p.abc import INetStream

from petald.kernels.training_forward import check_training_inputs, span_backward, span_forward
from petald.p2pnode.server.executor_bridge import run_task
from petald.p2pnode.server.stream_frames import receive_first, send_error
from petald.p2pnode.transport.framed_stream import FramedStream, PeerGone
from petald.protocol.errors import ErrorCode, ProtocolError
from petald.protocol.limits import MAX_FIRST_FRAME_BYTES, MAX_FRAME_BYTES
from petald.protocol.messages import SpanOutput, SpanRequest

if TYPE_CHECKING:
    from petald.p2pnode.server.block_server import BlockServer

log = logging.getLogger(__name__)

# A training job: the output (forward), or the gradients of the hidden states and the deep prompts.
TrainingJob = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]


class TrainingRequests:
    def __init__(self, server: BlockServer):
        self.server = server
        # Bounds the memory of training requests (each up to a full frame plus its activations): a
        # peer opening many training streams waits for a slot instead of filling the server.
        self._slots = trio.CapacityLimiter(server.limits.training_slots)

    async def handle(self, stream: INetStream) -> None:
        """One forward or backward request over whole sequences; nothing outlives the stream."""
        limits = self.server.limits
        framed = FramedStream(stream, MAX_FIRST_FRAME_BYTES, send_timeout=limits.step_timeout)
        peer = stream.muxed_conn.peer_id.to_string()[-8:]
        try:
            with trio.move_on_after(limits.open_timeout) as slot_scope:
                await self._slots.acquire()
            if slot_scope.cancelled_caught:
                raise ProtocolError(ErrorCode.BUSY, f"every training slot stayed taken for "
                                                    f"{limits.open_timeout:.0f} s; try another server or later")
            try:
                await self._serve(framed, stream.muxed_conn.peer_id.to_base58())
            finally:
                self._slots.release()
        except ProtocolError as err:
            log.info("training request from ..%s refused: %s", peer, err)
            await send_error(framed, err.code, err.message)
        except PeerGone as err:
            log.info("training request from ..%s: peer gone (%s)", peer, err)
        except Exception:  # a bug must cost one request, never the server
            log.exception("training request from ..%s failed", peer)
            await send_error(framed, ErrorCode.INTERNAL, "internal server error in a training request; "
                                                         "the server logged the details")
        finally:
            await framed.close()

    async def _serve(self, framed: FramedStream, peer_id: str) -> None:
        limits = self.server.limits
        framed.allow_frames_up_to(MAX_FRAME_BYTES, self.server.frame_budget)  # a training request carries its tensors in its first frame
        msg = await receive_first(framed, limits.open_timeout, "request")
        if msg is None:
            return
        request = SpanRequest.from_wire(msg)
        compute = self._job(request)
        h = request.hidden
        await self.server.peers.pace_training(peer_id, h.shape[0] * h.shape[1], framed.bytes_received,
                                              limits.open_timeout)
        with trio.move_on_after(limits.step_timeout) as step_scope:
            # On the device thread, between inference steps. A cancelled wait abandons the result
            # (and the job, if it has not started); the job holds nothing another request needs.
            tensor, grad_prompts = await run_task(self.server.executor, compute)
        if step_scope.cancelled_caught:
            raise ProtocolError(ErrorCode.TIMEOUT, f"the {'backward' if request.backward else 'forward'} "
                                                   f"took longer than {limits.step_timeout:.0f} s")
        await framed.send(SpanOutput(tensor, grad_prompts, request.backward, request.wire).to_wire())

    def _job(self, request: SpanRequest) -> TrainingJob:
        """Check ``request`` against this server and return the computation it asks for."""
        server = self.server
        if server.draining:
            raise server.shutting_down()
        server.check_model(request.fingerprint, request.model_id, request.start, request.end)
        adapter = server.adapter(request.adapter)
        tensors = {"hidden": request.hidden, "grad_output": request.grad_output, "prompts": request.prompts}
        for name, tensor in tensors.items():
            if tensor is not None and not torch.isfinite(tensor).all():
                raise ProtocolError(ErrorCode.BAD_TENSOR, f"{name} holds NaN or infinite values")
        # In float32: the wire format chose each tensor's dtype on its own (float16 or bfloat16 by its
        # range), and the span's own dtype is applied by the kernels.
        request.hidden = request.hidden.float()
        if request.grad_output is not None:
            request.grad_output = request.grad_output.float()
        if request.prompts is not None:
            request.prompts = request.prompts.float()
        h = request.hidden
        try:
            check_training_inputs(server.span, h, request.start, request.end, request.prompts)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_TENSOR, str(exc)) from None
        if request.grad_output is not None and request.grad_output.shape != h.shape:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"grad_output has shape {list(request.grad_output.shape)}; "
                                                      f"hidden has {list(h.shape)}")
        max_tokens = server.limits.max_training_tokens
        if h.shape[0] * h.shape[1] > max_tokens:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f"{h.shape[0]} x {h.shape[1]} tokens exceed this server's "
                                f"{max_tokens} per training request: send smaller chunks")
        span, start, end, prompts = server.span, request.start, request.end, request.prompts
        if request.grad_output is None:
            def forward() -> tuple[torch.Tensor, None]:
                with torch.no_grad():
                    return span_forward(span, h, start, end, prompts, adapter).to("cpu", torch.float32), None
            return forward
        grad = request.grad_output
        return lambda: span_backward(span, h, grad, start, end, prompts, adapter)
