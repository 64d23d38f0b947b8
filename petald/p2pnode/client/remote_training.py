"""The client's side of one training request to one server: a forward or a backward over a hop."""

from __future__ import annotations

import torch
import trio
from libp2p.abc import IHost

from petald.kernels.sources.model_source import ModelIdentity
from petald.p2pnode.client.client_options import ClientOptions
from petald.p2pnode.client.wire_choice import training_wire
from petald.p2pnode.routing.route import SpanHop
from petald.p2pnode.transport.peer_streams import ServerUnavailable, open_stream, receive_reply
from petald.protocol.errors import ProtocolError
from petald.protocol.framing import encode_frame
from petald.protocol.limits import TRAINING_PROTOCOL
from petald.protocol.messages import SpanOutput, SpanRequest


async def remote_span_pass(host: IHost, hop: SpanHop, identity: ModelIdentity, hidden: torch.Tensor,
                           prompts: torch.Tensor | None, grad_output: torch.Tensor | None, options: ClientOptions,
                           timeout: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocks ``hop`` of ``hop.server`` over ``hidden``: the outputs (no ``grad_output``), or the
    gradients of ``hidden`` and ``prompts`` (given ``grad_output``), with the adapter and wire of
    ``options``, each wait bounded by ``timeout``. Float32, checked for shape and
    finiteness: a server that answers otherwise is reported as ServerUnavailable."""
    peer = hop.server.peer_id
    request = SpanRequest(identity.model_id, identity.fingerprint, hop.start, hop.end, hidden, grad_output,
                          prompts, options.adapter, training_wire(options.wire))
    kind = "backward" if request.backward else "forward"
    what = f"a {kind}"
    # A request too large for the wire is the caller's error, raised before any server is involved
    # (and so never taken for a server's failure).
    try:
        frame = encode_frame(request.to_wire())
    except ProtocolError as exc:
        raise ValueError(f"a training request of {kind} over blocks {hop.start}:{hop.end} is too large: "
                         f"{exc.message}; lower max_chunk_tokens") from None
    framed = await open_stream(host, peer, TRAINING_PROTOCOL, timeout)
    try:
        with trio.fail_after(timeout):
            await framed.send_frame(frame)
        reply = SpanOutput.from_wire(await receive_reply(framed, peer, timeout, what), request.wire)
    except trio.TooSlowError:
        raise ServerUnavailable(f"server ..{peer[-8:]} did not take {what} within {timeout:.0f} s") from None
    finally:
        with trio.CancelScope(shield=True):
            await framed.close()
    if reply.backward != request.backward or reply.tensor.shape != hidden.shape:
        raise ServerUnavailable(f"server ..{peer[-8:]} answered {what} with shape {list(reply.tensor.shape)}; "
                                f"expected {list(hidden.shape)}")
    grad_prompts = reply.grad_prompts
    if request.backward and prompts is not None and (grad_prompts is None or grad_prompts.shape != prompts.shape):
        raise ServerUnavailable(f"server ..{peer[-8:]} sent no gradient of the prompts, or one of the wrong shape")
    tensors = [reply.tensor] + ([grad_prompts] if grad_prompts is not None else [])
    if not all(torch.isfinite(t).all() for t in tensors):
        raise ServerUnavailable(f"server ..{peer[-8:]} answered {what} with NaN or infinite values")
    return reply.tensor.float(), (grad_prompts.float() if grad_prompts is not None and prompts is not None else None)
