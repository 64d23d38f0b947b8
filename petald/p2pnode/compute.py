"""Await a forward step on the DeviceExecutor from trio without running torch on the event loop."""

from __future__ import annotations

from typing import Any

import torch
import trio

from petald.kernels.executor import DeviceExecutor
from petald.kernels.paged_kv_cache import SessionCache


async def run_step(executor: DeviceExecutor, cache: SessionCache, hidden: torch.Tensor, start: int, end: int,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """The step's output, on the CPU in ``out_dtype``, once the executor has run it (batched with others)."""
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[tuple[Any, BaseException | None]](1)

    def done(result: Any, error: BaseException | None) -> None:
        try:
            token.run_sync_soon(send.send_nowait, (result, error))
        except trio.RunFinishedError:
            pass  # the node has shut down; nobody is waiting any more

    executor.submit(cache, hidden, start, end, out_dtype, done)
    result, error = await receive.receive()
    if error is not None:
        raise error
    return result
