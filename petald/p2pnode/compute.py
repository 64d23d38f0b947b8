"""Await work on a DeviceExecutor from trio without running torch on the event loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

from petald.kernels.executor import DeviceExecutor

T = TypeVar("T")


async def run_on_executor(executor: DeviceExecutor, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the executor's thread; this task sleeps until it is done.

    The waiting task is parked and rescheduled directly from the executor's
    completion (through the trio token), with no channel or helper task: one
    wake-up of this loop per job. Cancelling the wait abandons the result (the
    job itself still runs: torch work cannot be interrupted), exactly like
    trio's own ``to_thread.run_sync(..., abandon_on_cancel=True)``.
    """
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()
    waiting = True

    def wake(result: outcome.Outcome) -> None:
        # Runs on the trio thread; the task may have been cancelled meanwhile.
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
    executor.submit(fn, done)
    return await trio.lowlevel.wait_task_rescheduled(abort)
