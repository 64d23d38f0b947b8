"""What the local API generates with: one ``DistributedModel``, created on first use.

The model's methods block (torch for embeddings, the LM head and sampling; network waits on
its own node thread), so they run in worker threads through ``trio.to_thread.run_sync``;
tokens come back to the API's trio loop through ``trio.from_thread`` into a memory channel.
A generation stops early, by raising from its streamer, when a stop string appears or its
client goes away.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from petald.cli.api.token_rate import TokenRate
from petald.cli.text_assembler import TextAssembler
from petald.kernels.sampling import end_of_sequence_ids
from petald.kernels.sources.model_source import ModelSource
from petald.p2pnode.client.client_options import ClientOptions
from petald.p2pnode.client.distributed_model import DistributedModel
from petald.p2pnode.transport.node_metrics import NodeMetrics

log = logging.getLogger(__name__)

MAX_CONCURRENT_GENERATIONS = 8  # worker threads generating at once; more requests wait their turn


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class TextPiece:
    """New text (possibly empty while a character or a stop string is incomplete) and its token."""
    text: str
    token_id: int


@dataclass
class GenerationEnd:
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    text_tail: str = ""  # text held back until the end (a partial stop string that never completed)


class _StopGeneration(Exception):
    """Raised from the streamer to end ``generate`` early."""


class ModelBackend:
    """The daemon's DistributedModel and the work the API asks of it.

    ``initial_peers`` are the swarm nodes the model joins through (a server passes its own
    address). The model is created by the first request that needs it, not at start: a
    server's swarm may not cover every block yet, and a daemon nobody asks costs no memory
    for the embeddings and LM head. A failed creation is retried by the next request.
    """

    def __init__(self, source: ModelSource, initial_peers: Sequence[str],
                 make_model: Callable[[], DistributedModel] | None = None, head_quant: str = "none",
                 metrics: NodeMetrics | None = None, options: ClientOptions | None = None):
        """``metrics``: the node's, which the model counts into (None: the model's own); ``options``:
        the model's other settings (a private swarm's key and owner, the node's identity file)."""
        self.source = source
        self.identity = source.identity
        self.initial_peers = list(initial_peers)
        self.head_quant = head_quant
        self._make_model = make_model or (lambda: DistributedModel(model=source, initial_peers=self.initial_peers,
                                                                   head_quant=head_quant, metrics=metrics,
                                                                   options=options))
        self._model: DistributedModel | None = None
        self._creating = trio.Lock()
        self._limiter = trio.CapacityLimiter(MAX_CONCURRENT_GENERATIONS)
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe across threads
        self._nursery: trio.Nursery | None = None
        self._stops: set[threading.Event] = set()
        self.generations_running = 0  # worker threads generating now (or waiting for a thread)
        self.generations_total = 0  # since start
        self.tokens_generated = 0  # since start, over all requests
        self.token_rate = TokenRate()

    @property
    def model_loaded(self) -> bool:
        return self._model is not None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ModelBackend]:
        """Owns the generation tasks; on exit stops every generation and closes the model."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    yield self
                finally:
                    for stop in list(self._stops):
                        stop.set()
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            if self._model is not None:
                model, self._model = self._model, None
                with trio.CancelScope(shield=True):  # shutting down is usually a cancellation
                    await trio.to_thread.run_sync(model.close)

    async def model(self) -> DistributedModel:
        async with self._creating:
            if self._model is None:
                log.info("joining the swarm for %s through %s", self.identity.model_id, self.initial_peers)
                self._model = await trio.to_thread.run_sync(self._make_model)
        return self._model

    # --- tokens ----------------------------------------------------------------------------

    def _tokenizer_now(self) -> Any:
        """The tokenizer; call with ``_tokenizer_lock`` held, in a worker thread."""
        if self._tokenizer is None:
            self._tokenizer = self.source.load_tokenizer()
        return self._tokenizer

    async def encode_text(self, text: str) -> list[int]:
        def encode() -> list[int]:
            with self._tokenizer_lock:
                return list(self._tokenizer_now()(text)["input_ids"])

        return await trio.to_thread.run_sync(encode)

    async def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        def encode() -> list[int]:
            with self._tokenizer_lock:
                tokenizer = self._tokenizer_now()
                if not getattr(tokenizer, "chat_template", None):
                    raise ValueError(f"{self.identity.model_id} has no chat template: use /v1/completions")
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
                return list(ids)

        return await trio.to_thread.run_sync(encode)

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self._tokenizer_now().decode(ids, skip_special_tokens=True)

    # --- generation ------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TextPiece | GenerationEnd]:
        """Pieces of text as tokens are chosen, then one ``GenerationEnd``; errors are raised."""
        if self._nursery is None:
            raise RuntimeError("the backend is not running")
        model = await self.model()
        send, receive = trio.open_memory_channel[Any](math.inf)
        stop = threading.Event()
        self._stops.add(stop)
        self._nursery.start_soon(self._generate_in_thread, model, request, send, stop)
        try:
            async with receive:
                async for event in receive:
                    if isinstance(event, BaseException):
                        raise event
                    yield event
        finally:
            stop.set()  # the client went away (or we finished): the thread stops at its next token
            self._stops.discard(stop)

    async def _generate_in_thread(self, model: DistributedModel, request: GenerationRequest,
                                  send: trio.MemorySendChannel[Any], stop: threading.Event) -> None:
        self.generations_running += 1
        self.generations_total += 1
        async with send:
            try:
                end = await trio.to_thread.run_sync(self._generate_blocking, model, request, send, stop,
                                                    limiter=self._limiter)
            except Exception as exc:
                send.send_nowait(exc)
                return
            finally:
                self.generations_running -= 1
            if end is not None:
                try:
                    send.send_nowait(end)
                except trio.BrokenResourceError:
                    pass

    def _generate_blocking(self, model: DistributedModel, request: GenerationRequest,
                           send: trio.MemorySendChannel[Any], stop: threading.Event) -> GenerationEnd | None:
        import torch

        if stop.is_set():
            return None  # the client left while this request waited for a thread
        with self._tokenizer_lock:
            eos = end_of_sequence_ids(model.config.eos_token_id, self._tokenizer_now().eos_token_id)
        assembler = TextAssembler(self._decode, request.stop)
        state = {"count": 0, "eos": False}

        def streamer(column: torch.Tensor) -> None:
            token = int(column[0])
            state["count"] += 1
            self.tokens_generated += 1  # an int += from worker threads: exact enough for a gauge
            self.token_rate.add()
            if token in eos:
                state["eos"] = True
            delta = assembler.add(token)
            try:
                trio.from_thread.run_sync(send.send_nowait, TextPiece(delta, token))
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
                raise _StopGeneration from None
            if assembler.stopped or stop.is_set():
                raise _StopGeneration

        ids = torch.tensor([request.prompt_ids], dtype=torch.long)
        try:
            model.generate(ids, max_new_tokens=request.max_new_tokens, do_sample=request.temperature > 0,
                           temperature=request.temperature, top_p=request.top_p, seed=request.seed,
                           eos_token_id=eos, streamer=streamer)
        except _StopGeneration:
            if not assembler.stopped:
                return None  # the client went away
        reason = "stop" if assembler.stopped or state["eos"] else "length"
        return GenerationEnd(reason, len(request.prompt_ids), state["count"], assembler.tail())

    # --- blocks ----------------------------------------------------------------------------

    async def run_blocks(self, hidden: Any, start: int, end: int) -> Any:
        model = await self.model()
        return await trio.to_thread.run_sync(model.run_blocks, hidden, start, end, limiter=self._limiter)
