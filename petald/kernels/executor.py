"""One thread per device runs every forward step, batching the steps that are ready together.

Callers submit a session's step (its cache, hidden states, sub-span) and a
completion callback; the callback runs on the executor thread, so callers that
live on an event loop hop back to it themselves (p2pnode does that with a trio
token).

Continuous batching: each turn, the thread takes every step that has arrived,
and runs one batched forward per sub-span (``BlockSpan.forward_batch``): the
matmuls run once over all sessions' tokens, attention per session over its own
pages. A step longer than one token (a prefill) advances by at most
``prefill_chunk`` tokens per turn (shared by all prefills of that turn, oldest
first), so a long prompt never holds other sessions' decode steps for its whole
length: they join the next turn.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from petald.kernels.paged_kv_cache import SessionCache
from petald.kernels.span import BlockSpan

log = logging.getLogger(__name__)

Completion = Callable[[Any, BaseException | None], None]
DEFAULT_PREFILL_CHUNK = 128


_STOP = object()


@dataclass
class StepJob:
    cache: SessionCache
    hidden: torch.Tensor  # [batch, tokens, hidden]
    start: int
    end: int
    out_dtype: torch.dtype
    done: Completion
    offset: int = 0  # tokens already run
    outputs: list[torch.Tensor] = field(default_factory=list)
    finished: bool = False

    @property
    def remaining(self) -> int:
        return self.hidden.shape[1] - self.offset


class DeviceExecutor:
    def __init__(self, span: BlockSpan, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, name: str = "petald-executor"):
        self.span, self.prefill_chunk = span, prefill_chunk
        self.batch_sizes: list[int] = []  # steps run in each batched forward, for tests and benchmarks
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, cache: SessionCache, hidden: torch.Tensor, start: int, end: int, out_dtype: torch.dtype,
               done: Completion) -> None:
        """Run ``hidden`` through blocks [start, end) for ``cache``; ``done(output on CPU, error)`` follows."""
        self._jobs.put(StepJob(cache, hidden, start, end, out_dtype, done))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._jobs.put(_STOP)
        self._thread.join(timeout)

    def _loop(self) -> None:
        pending: list[StepJob] = []
        while True:
            arrived = [] if pending else [self._jobs.get()]  # wait only when nothing is in progress
            while True:
                try:
                    arrived.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            for job in arrived:
                if job is _STOP:
                    for p in pending:
                        self._finish(p, None, RuntimeError("the server is shutting down"))
                    return
                pending.append(job)
            pending = self._turn(pending)

    def _turn(self, pending: list[StepJob]) -> list[StepJob]:
        """One batched forward per sub-span: every decode step, and prefill chunks up to the budget."""
        budget = self.prefill_chunk
        groups: dict[tuple[int, int], list[tuple[StepJob, int]]] = {}
        for job in pending:
            if job.cache.closed:
                self._finish(job, None, ValueError("the session was closed"))
                continue
            tokens = 1 if job.remaining == 1 else min(job.remaining, budget)
            if tokens == 0:
                continue  # this prefill waits for the next turn
            if job.remaining > 1:
                budget -= tokens
            groups.setdefault((job.start, job.end), []).append((job, tokens))
        for (start, end), group in groups.items():
            self._run(group, start, end)
        return [job for job in pending if not job.finished]

    def _run(self, group: list[tuple[StepJob, int]], start: int, end: int) -> None:
        try:
            outputs = self.span.forward_batch(
                [(job.hidden[:, job.offset : job.offset + tokens], job.cache) for job, tokens in group], start, end)
        except Exception as exc:
            if len(group) > 1:  # one bad step must not fail the others: run each alone
                for item in group:
                    self._run([item], start, end)
            else:
                self._finish(group[0][0], None, exc)
            return
        self.batch_sizes.append(len(group))
        for (job, tokens), out in zip(group, outputs, strict=True):
            job.outputs.append(out)
            job.offset += tokens
            if job.remaining == 0:
                try:
                    result = torch.cat(job.outputs, dim=1).to("cpu", job.out_dtype)
                except Exception as exc:
                    self._finish(job, None, exc)
                else:
                    self._finish(job, result, None)

    @staticmethod
    def _finish(job: StepJob, result: Any, error: BaseException | None) -> None:
        job.finished = True
        job.outputs.clear()
        try:
            job.done(result, error)
        except Exception:
            log.exception("executor completion callback failed")
