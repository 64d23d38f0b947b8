"""One thread per device runs every forward step, batching the steps that are ready together.

Callers submit a session's step (its cache, hidden states, sub-span) and a
completion callback; the callback runs on the executor thread, so callers that
live on an event loop hop back to it themselves (p2pnode does that with a trio
token).

Continuous batching: each turn, the thread takes every step that has arrived,
and runs one batched forward per sub-span and LoRA adapter (``BlockSpan.forward_batch``): the
matmuls run once over all sessions' tokens, attention per session over its own
pages. A step longer than one token (a prefill) advances by at most
``prefill_chunk`` tokens per turn (shared by the turn's prefills; those that ran
go behind the others for the next turn), so a long prompt never holds other
sessions' decode steps, nor their prompts, for its whole length: they join the
next turn. Beside decode steps a turn takes fewer prefill tokens: as many as keep
it within ``DECODE_TURN_STRETCH`` of a turn of decode steps alone, by the measured
cost of a prefill token (at least ``MIN_PREFILL_TOKENS``), so that prompts,
anyone's, do not slow the decode steps waiting beside them past that. A step
whose waiter gave up (``StepJob.cancel``) is dropped at its next turn: a client
that leaves mid-prefill costs at most one chunk more. Other work for the device (training forwards and
backwards) runs one job per turn, after the turn's steps: decode steps never wait
behind a queue of training jobs. Before a turn, the thread waits briefly (at
most a quarter of the last turn) for the sessions served in the last turn, whose
next steps are on their way, so that concurrent sessions stay in one batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from petald.kernels.paged_kv_cache import SessionCache
from petald.kernels.span import BlockSpan

log = logging.getLogger(__name__)

Completion = Callable[[Any, BaseException | None], None]
DEFAULT_PREFILL_CHUNK = 128
DEFAULT_GATHER_FRACTION = 0.25  # of the last turn's duration, at most, spent waiting for expected steps
# A turn that runs decode steps may take this much longer than one of decode steps alone for the
# prefill chunks beside them: a decode step waits for its whole turn, so without a bound one peer's
# prompts made another's decode steps 5.9x slower (issue 22; benchmarks/peer_flood.py). The
# prefill budget of such a turn is sized from the measured cost of a prefill token.
DECODE_TURN_STRETCH = 1.0
MIN_PREFILL_TOKENS = 8  # a turn's prefill budget never goes below it: prompts still advance
_LEARNING_RATE = 0.2  # of each new turn's timing in the running estimates


_STOP = object()


@dataclass
class StepJob:
    cache: SessionCache
    hidden: torch.Tensor  # [batch, tokens, hidden]
    start: int
    end: int
    out_dtype: torch.dtype
    done: Completion
    prompts: torch.Tensor | None = None  # deep prompts for the step's first tokens (BlockSpan.forward_batch)
    adapter: str | None = None  # the LoRA adapter this session runs with
    offset: int = 0  # tokens already run
    outputs: list[torch.Tensor] = field(default_factory=list)
    finished: bool = False
    cancelled: bool = False  # set from any thread; read by the executor between chunks

    def cancel(self) -> None:
        """Drop the step at its next turn (its completion then reports an error); a running chunk ends first."""
        self.cancelled = True

    @property
    def remaining(self) -> int:
        return self.hidden.shape[1] - self.offset


@dataclass
class TaskJob:
    """Any other work for the device: ``run()``'s result (or error) goes to ``done``."""

    run: Callable[[], Any]
    done: Completion


@dataclass(frozen=True)
class BatchedForward:
    """What one batched forward ran: blocks [start, end) with ``adapter``, for ``steps`` (each
    session's cache and how many tokens of its step ran), in the order they were submitted."""

    start: int
    end: int
    adapter: str | None
    steps: tuple[tuple[SessionCache, int], ...]


class DeviceExecutor:
    """``on_forward``, where given, hears of each batched forward that succeeded
    (``BatchedForward``), on the executor thread, before that forward's steps complete."""

    def __init__(self, span: BlockSpan, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 gather_fraction: float = DEFAULT_GATHER_FRACTION, name: str = "petald-executor",
                 on_forward: Callable[[BatchedForward], None] | None = None):
        self.span, self.prefill_chunk, self.gather_fraction = span, prefill_chunk, gather_fraction
        self.on_forward = on_forward
        self._decode_turn: float | None = None  # seconds of a turn of decode steps alone (running estimate)
        self._per_prefill_token: float | None = None  # seconds a prefill token adds to a turn
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, cache: SessionCache, hidden: torch.Tensor, start: int, end: int, out_dtype: torch.dtype,
               done: Completion, prompts: torch.Tensor | None = None, adapter: str | None = None) -> StepJob:
        """Run ``hidden`` through blocks [start, end) for ``cache``, with deep ``prompts`` and LoRA ``adapter``
        where given; ``done(output on CPU, error)`` follows. The job returned can be cancelled."""
        # "" (the wire's "no adapter") and None must batch together.
        job = StepJob(cache, hidden, start, end, out_dtype, done, prompts, adapter or None)
        self._jobs.put(job)
        return job

    def submit_task(self, run: Callable[[], Any], done: Completion) -> None:
        """Run ``run()`` on the device thread between batched steps; ``done(result, error)`` follows."""
        self._jobs.put(TaskJob(run, done))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._jobs.put(_STOP)
        self._thread.join(timeout)

    def _loop(self) -> None:
        pending: list[StepJob] = []
        tasks: deque[TaskJob] = deque()
        expected: dict[int, SessionCache] = {}  # sessions whose step finished last turn: their next one is coming
        last_turn = 0.0
        while True:
            arrived = [] if pending or tasks else [self._jobs.get()]  # block only when nothing is in progress
            while True:
                try:
                    arrived.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            arrived += self._gather(expected, pending + arrived, self.gather_fraction * last_turn)
            for job in arrived:
                if job is _STOP:
                    for p in pending:
                        self._finish(p, None, RuntimeError("the server is shutting down"))
                    for t in tasks:
                        t.done(None, RuntimeError("the server is shutting down"))
                    return
                (tasks if isinstance(job, TaskJob) else pending).append(job)
            if pending:
                started = time.monotonic()
                pending, finished, prefilled = self._turn(pending)
                last_turn = time.monotonic() - started
                self._learn(last_turn, prefilled)
                expected = {id(job.cache): job.cache for job in finished}
            if tasks:
                self._run_task(tasks.popleft())

    @staticmethod
    def _run_task(task: TaskJob) -> None:
        try:
            result = task.run()
        except Exception as exc:
            result, error = None, exc
        else:
            error = None
        try:
            task.done(result, error)
        except Exception:
            log.exception("executor completion callback failed")

    def _gather(self, expected: dict[int, SessionCache], have: list[Any], window: float) -> list[Any]:
        """Wait up to ``window`` seconds for the sessions served last turn to send their next step.

        Their outputs left together, so their next steps arrive within a network round trip of each
        other; starting a turn with only the first would split them into turns of one, for good.
        """
        waiting = {key for key, cache in expected.items() if not cache.closed}
        waiting -= {id(job.cache) for job in have if isinstance(job, StepJob)}
        got: list[Any] = []
        deadline = time.monotonic() + window
        while waiting and not any(job is _STOP for job in have) and (left := deadline - time.monotonic()) > 0:
            try:
                job = self._jobs.get(timeout=left)
            except queue.Empty:
                break
            got.append(job)
            if job is _STOP:
                break
            if isinstance(job, StepJob):
                waiting.discard(id(job.cache))
        return got

    def _prefill_budget(self, decoding: bool) -> int:
        """Prefill tokens this turn: ``prefill_chunk``, or, beside decode steps, what keeps the turn
        within ``DECODE_TURN_STRETCH`` more than decode steps alone take."""
        if not decoding or self._decode_turn is None or not self._per_prefill_token:
            return self.prefill_chunk
        allowed = int(DECODE_TURN_STRETCH * self._decode_turn / self._per_prefill_token)
        return max(MIN_PREFILL_TOKENS, min(self.prefill_chunk, allowed))

    def _learn(self, seconds: float, prefill_tokens: int) -> None:
        def blend(old: float | None, new: float) -> float:
            return new if old is None else old + _LEARNING_RATE * (new - old)

        if prefill_tokens == 0:
            self._decode_turn = blend(self._decode_turn, seconds)
        elif self._decode_turn is not None:
            self._per_prefill_token = blend(self._per_prefill_token,
                                            max(0.0, seconds - self._decode_turn) / prefill_tokens)

    def _turn(self, pending: list[StepJob]) -> tuple[list[StepJob], list[StepJob], int]:
        """One batched forward per sub-span and adapter: every decode step, and prefill chunks up to the budget.

        Returns the steps still in progress (the prefills that ran this turn last, so that the next
        turn's budget goes to the others first), the steps that finished and the prefill tokens run."""
        budget = start_budget = self._prefill_budget(any(job.remaining == 1 for job in pending))
        groups: dict[tuple[int, int, str | None], list[tuple[StepJob, int]]] = {}
        prefilled: set[int] = set()
        for job in pending:
            if job.cache.closed or job.cancelled:
                self._finish(job, None, ValueError("the session was closed" if job.cache.closed
                                                   else "the step was cancelled"))
                continue
            tokens = 1 if job.remaining == 1 else min(job.remaining, budget)
            if tokens == 0:
                continue  # this prefill waits for the next turn
            if job.remaining > 1:
                budget -= tokens
                prefilled.add(id(job))
            # Sessions with different adapters compute different projections: never one forward.
            groups.setdefault((job.start, job.end, job.adapter), []).append((job, tokens))
        for (start, end, adapter), group in groups.items():
            self._run(group, start, end, adapter)
        going = [job for job in pending if not job.finished]
        going.sort(key=lambda job: id(job) in prefilled)  # stable: otherwise in the order they came
        return going, [job for job in pending if job.finished], start_budget - budget

    def _run(self, group: list[tuple[StepJob, int]], start: int, end: int, adapter: str | None) -> None:
        try:
            outputs = self.span.forward_batch(
                [(job.hidden[:, job.offset : job.offset + tokens], job.cache) for job, tokens in group], start, end,
                [self._prompt_part(job, tokens) for job, tokens in group] if any(j.prompts is not None for j, _ in group)
                else None, adapter)
        except Exception as exc:
            if len(group) > 1:  # one bad step must not fail the others: run each alone
                for item in group:
                    self._run([item], start, end, adapter)
            else:
                self._finish(group[0][0], None, exc)
            return
        if self.on_forward is not None:
            try:
                ran = tuple((job.cache, tokens) for job, tokens in group)
                self.on_forward(BatchedForward(start, end, adapter, ran))
            except Exception:
                log.exception("executor on_forward callback failed")
        for (job, tokens), out in zip(group, outputs, strict=True):
            job.outputs.append(out)
            job.offset += tokens
            if job.remaining == 0:
                try:
                    whole = job.outputs[0] if len(job.outputs) == 1 else torch.cat(job.outputs, dim=1)
                    result = whole.to("cpu", job.out_dtype)
                except Exception as exc:
                    self._finish(job, None, exc)
                else:
                    self._finish(job, result, None)

    @staticmethod
    def _prompt_part(job: StepJob, tokens: int) -> torch.Tensor | None:
        """The deep prompts of the chunk [offset, offset + tokens) of a step (a prefill runs in chunks)."""
        if job.prompts is None or job.offset >= job.prompts.shape[2]:
            return None
        return job.prompts[:, :, job.offset : job.offset + tokens]

    @staticmethod
    def _finish(job: StepJob, result: Any, error: BaseException | None) -> None:
        job.finished = True
        job.outputs.clear()
        try:
            job.done(result, error)
        except Exception:
            log.exception("executor completion callback failed")
