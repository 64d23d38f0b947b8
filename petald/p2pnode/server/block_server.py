"""The server role for one span of blocks: its KV pool and executor, the checks every request
passes, and a handler per protocol.

- ``/petald/info``: what the server holds (here);
- ``/petald/inference``: long-lived sessions, one stream each (``inference_handler.py``);
- ``/petald/training``: one forward or backward per stream (``training_handler.py``);
- ``/petald/push``: steps other servers push into this server's sessions (``push_handler.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from petald.kernels.adapters.lora import AdapterError, LoraAdapter
from petald.kernels.executor import DeviceExecutor
from petald.kernels.paged_kv_cache import DEFAULT_PAGE_SIZE
from petald.kernels.sources.model_source import ModelIdentity
from petald.kernels.span import BlockSpan
from petald.p2pnode.server.fault_switch import FaultSwitch
from petald.p2pnode.server.inference_handler import InferenceSessions
from petald.p2pnode.server.member_gate import members_only
from petald.p2pnode.server.peer_limits import PeerLedger, PeerLimits
from petald.p2pnode.server.push_handler import PushInboxes
from petald.p2pnode.server.server_info import span_info
from petald.p2pnode.server.stream_frames import receive_first, send_error
from petald.p2pnode.server.training_handler import TrainingRequests
from petald.p2pnode.swarm.membership import SwarmMembership
from petald.p2pnode.transport.frame_budget import FrameBudget
from petald.p2pnode.transport.framed_stream import FramedStream, PeerGone
from petald.p2pnode.transport.node_metrics import NodeMetrics
from petald.protocol.errors import ErrorCode, ProtocolError
from petald.protocol.limits import (
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    MAX_FIRST_FRAME_BYTES,
    PUSH_PROTOCOL,
    RECEIVING_FRAMES_BUDGET_BYTES,
    TRAINING_PROTOCOL,
)
from petald.protocol.messages import ServerInfo, expect_type


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
    receive_budget: int = RECEIVING_FRAMES_BUDGET_BYTES  # bytes of frames held received in part, all streams
    peer: PeerLimits = field(default_factory=PeerLimits)  # what one peer may take (peer_limits.py)


class BlockServer:
    def __init__(self, identity: ModelIdentity, span: BlockSpan, executor: DeviceExecutor,
                 limits: ServerLimits | None = None, metrics: NodeMetrics | None = None,
                 faults: FaultSwitch | None = None):
        """``metrics``: the node's, counted into (None: a registry of its own, never scraped).
        ``faults``: test-only, sessions answer wrongly on purpose (``fault_switch.py``)."""
        self.faults = faults
        self.identity = identity
        self.span = span
        self.executor = executor
        self.limits = limits or ServerLimits()
        self.limits.max_length = min(self.limits.max_length, span.max_positions)
        self.pool = span.new_pool(self.limits.cache_tokens, self.limits.page_size)
        self.metrics = metrics = metrics or NodeMetrics()
        # The newest span's pool is the one a scrape reads (a moved-from span only winds down).
        pool, tokens_per_page = self.pool, self.pool.page_size * self.pool.num_blocks
        metrics.watch(metrics.kv_pages.labels("total"), lambda: pool.num_pages)
        metrics.watch(metrics.kv_pages.labels("reserved"), lambda: pool.num_pages - pool.free_tokens // tokens_per_page)
        metrics.watch(metrics.sessions_live, lambda: self.live_sessions)
        self.host: IHost | None = None  # set by register(); pushes dial from it
        self.draining = False  # refuse new sessions (the server is leaving)
        self.closing = False  # end running sessions at their next step boundary
        # Shared by every stream of this server's protocols (while a node moves its span, the old
        # server winds down with its own).
        self.frame_budget = FrameBudget(self.limits.receive_budget)
        self.peers = PeerLedger(self.limits.peer, self.pool.num_pages)
        self.pushes = PushInboxes(self.limits, self.frame_budget)
        self.sessions = InferenceSessions(self)
        self.training = TrainingRequests(self)

    @property
    def live_sessions(self) -> int:
        return self.sessions.live

    def close_sessions(self) -> None:
        """End every session: idle ones now, those in a step once the step's output is sent.

        Each gets a ``shutting_down`` error, on which its client replays its history elsewhere."""
        self.draining = self.closing = True
        self.sessions.end_idle()

    def register(self, host: IHost, members: SwarmMembership | None = None) -> None:
        """Serve on ``host``; ``members``: a private swarm's member list, whose non-members are refused."""
        self.host = host
        host.set_stream_handler(TProtocol(INFO_PROTOCOL), members_only(self._handle_info, members))
        host.set_stream_handler(TProtocol(PUSH_PROTOCOL), members_only(self.pushes.handle, members))
        host.set_stream_handler(TProtocol(INFERENCE_PROTOCOL), members_only(self.sessions.handle, members))
        host.set_stream_handler(TProtocol(TRAINING_PROTOCOL), members_only(self.training.handle, members))

    def info(self) -> ServerInfo:
        span = self.span
        return span_info(self.identity, span.start, span.end, span.dtype, span.quant, span.hidden_size,
                         self.limits.max_length, self.pool.free_tokens, span.adapters,
                         self.pool.capacity_tokens)

    async def _handle_info(self, stream: INetStream) -> None:
        framed = FramedStream(stream, MAX_FIRST_FRAME_BYTES, send_timeout=self.limits.open_timeout)
        try:
            msg = await receive_first(framed, self.limits.open_timeout, "info request")
            if msg is not None:
                expect_type(msg, "info")
                await framed.send(self.info().to_wire())
        except ProtocolError as err:
            await send_error(framed, err.code, err.message)
        except PeerGone:
            pass
        finally:
            await framed.close()

    # --- the checks every request passes ---------------------------------------------------------

    def shutting_down(self) -> ProtocolError:
        return ProtocolError(ErrorCode.SHUTTING_DOWN, "this server is shutting down; continue on another server")

    def check_model(self, fingerprint: str, model_id: str, start: int, end: int) -> None:
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

    def adapter(self, name: str) -> LoraAdapter | None:
        """The span's adapter ``name`` ("": none); one it does not hold is refused."""
        try:
            return self.span.adapter_named(name)
        except AdapterError as exc:
            raise ProtocolError(ErrorCode.UNKNOWN_ADAPTER, str(exc)) from None
