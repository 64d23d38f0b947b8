"""One thread per device runs every torch call, in the order they were submitted.

Callers hand in a function and a completion callback; the callback runs on the
executor thread, so callers that live on an event loop must hop back to it
themselves (p2pnode does that with a trio token). Batching of ready steps
(continuous batching) will live here.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Completion = Callable[[Any, BaseException | None], None]


class DeviceExecutor:
    def __init__(self, name: str = "petald-executor"):
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Completion] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], done: Completion) -> None:
        self._jobs.put((fn, done))

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, done = job
            try:
                result, error = fn(), None
            except BaseException as exc:  # handed to the caller, never lost
                result, error = None, exc
            try:
                done(result, error)
            except Exception:
                log.exception("executor completion callback failed")

    def shutdown(self, timeout: float = 10.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)
