"""Tokens per second, as generated lately: what /health and the dashboard show."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 10.0  # tokens older than this no longer count: the figure follows what happens now


class TokenRate:
    """Counts tokens as they are generated (from any thread) and says how fast they came."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s, self.clock = window_s, clock
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self._times.append(self.clock())

    def per_second(self) -> float:
        """Tokens per second over the window: from the oldest token in it to now, so that a
        generation a few seconds old is measured over its own time, and an idle node decays to 0."""
        now = self.clock()
        with self._lock:
            while self._times and self._times[0] < now - self.window_s:
                self._times.popleft()
            count = len(self._times)
            oldest = self._times[0] if self._times else now
        span = now - oldest
        return (count - 1) / span if count >= 2 and span > 0 else 0.0
