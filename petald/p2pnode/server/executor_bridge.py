"""Await a forward step on the DeviceExecutor from trio without running torch on the event loop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import outcome
import torch
import trio

from petald.kernels.executor import Completion, DeviceExecutor, StepJob
from petald.kernels.paged_kv_cache import SessionCache

log = logging.getLogger(__name__)


class StepInFlight:
    """One step handed to the executor, as the event loop sees it: whether the executor is done with
    it, and what must happen then (``when_ended``) even if its waiter gave up long before.

    Until the step ends it may still write into its session's pages, so they must not be freed;
    ``cancel`` makes the executor drop it between chunks, and ``when_ended(free)`` frees them once
    it has. Everything here runs on the trio thread: an action runs exactly once, after the end."""

    def __init__(self) -> None:
        self.job: StepJob | None = None
        self.ended = False
        self._then: list[Callable[[], None]] = []

    @property
    def running(self) -> bool:
        """Submitted and not ended: the executor may still write into the step's pages."""
        return self.job is not None and not self.ended

    def cancel(self) -> None:
        if self.running:
            self.job.cancel()

    def when_ended(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the step has ended (now, if it is not running)."""
        if self.running:
            self._then.append(action)
        else:
            action()

    def end(self) -> None:
        self.ended = True
        then, self._then = self._then, []
        for action in then:
            try:
                action()
            except Exception:  # runs inside the loop's own callback: an error here would end the node
                log.exception("an action at the end of a step failed")


async def run_step(executor: DeviceExecutor, cache: SessionCache, hidden: torch.Tensor, start: int, end: int,
                   out_dtype: torch.dtype, flight: StepInFlight | None = None,
                   prompts: torch.Tensor | None = None, adapter: str | None = None) -> torch.Tensor:
    """The step's output, on the CPU in ``out_dtype``, once the executor has run it (batched with others).

    ``adapter`` names the span's LoRA adapter this session runs with (None: the base model).

    ``flight`` ends when the executor is done with the step, even if this wait was cancelled.
    """
    flight = flight if flight is not None else StepInFlight()

    def submit(done: Completion) -> None:
        flight.job = executor.submit(cache, hidden, start, end, out_dtype, done, prompts, adapter)

    return await await_completion(submit, flight.end)


async def run_task(executor: DeviceExecutor, run: Callable[[], Any]) -> Any:
    """``run()``'s result, computed on the device thread between batched steps (training work).

    A wait that is cancelled (a timeout) before the job has started drops the job: nobody would
    read its result, and a queue of abandoned jobs must not keep the device busy."""
    abandoned = threading.Event()

    def unless_abandoned() -> Any:
        if abandoned.is_set():
            raise RuntimeError("the request was abandoned before its job started")
        return run()

    try:
        return await await_completion(lambda done: executor.submit_task(unless_abandoned, done))
    finally:
        abandoned.set()


async def await_completion(submit: Callable[[Completion], None], ended: Callable[[], None] | None = None) -> Any:
    """Call ``submit(done)`` and sleep until another thread calls ``done(result, error)``; ``ended()``
    then runs on the trio thread, whether or not the wait was cancelled meanwhile.

    The waiting task is parked and rescheduled directly from the completion (through the
    trio token), with no channel or helper task: one wake-up of this loop per job.
    Cancelling the wait abandons the result (the job itself still runs: torch work cannot
    be interrupted), exactly like trio's ``to_thread.run_sync(..., abandon_on_cancel=True)``.
    """
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()
    waiting = True

    def wake(result: outcome.Outcome) -> None:
        # Runs on the trio thread; the task may have been cancelled meanwhile.
        if ended is not None:
            ended()
        if waiting:
            trio.lowlevel.reschedule(task, result)

    def done(result: Any, error: BaseException | None) -> None:
        try:
            token.run_sync_soon(wake, outcome.Error(error) if error is not None else outcome.Value(result))
        except trio.RunFinishedError:
            pass  # the node has shut down; nobody is waiting any more

    def abort(_: Any) -> trio.lowlevel.Abort:
        nonlocal waiting
        waiting = False
        return trio.lowlevel.Abort.SUCCEEDED

    await trio.lowlevel.checkpoint_if_cancelled()
    submit(done)
    return await trio.lowlevel.wait_task_rescheduled(abort)
