"""Await work on a DeviceExecutor from trio without running torch on the event loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

from petald.kernels.executor import DeviceExecutor

T = TypeVar("T")


async def run_on_executor(executor: DeviceExecutor, fn: Callable[[], T]) -> T:
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[tuple[Any, BaseException | None]](1)

    def done(result: Any, error: BaseException | None) -> None:
        try:
            token.run_sync_soon(send.send_nowait, (result, error))
        except trio.RunFinishedError:
            pass  # the node has shut down; nobody is waiting any more

    executor.submit(fn, done)
    result, error = await receive.receive()
    if error is not None:
        raise error
    return result
