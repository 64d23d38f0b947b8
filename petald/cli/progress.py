"""Progress of long steps (loading blocks, measuring throughput): a tqdm bar on a terminal,
plain lines otherwise, so that journald and log files get no carriage returns or ANSI codes."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

PLAIN_STEPS = 5  # lines per task when there is no terminal


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressDisplay:
    """Call as ``progress(what, done, total)`` from any thread; one bar (or a few lines) per ``what``."""

    def __init__(self, say: Callable[[str], None], stream: TextIO | None = None, bars: bool | None = None):
        self.say = say
        self.stream = stream if stream is not None else sys.stderr
        self.bars = is_terminal(self.stream) if bars is None else bars
        self._open: dict[str, Any] = {}
        self._last_step: dict[str, int] = {}
        self._last_done: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, what: str, done: int, total: int) -> None:
        if total <= 0:
            return
        with self._lock:
            last = self._last_done.get(what, -1)
            if done == last or (last >= total and done >= total):
                return  # said already (a task may report its end twice)
            if done < last:  # the same task again (e.g. a new span): start afresh
                self._last_step.pop(what, None)
            self._last_done[what] = done
            if self.bars:
                self._bar(what, done, total)
            else:
                self._line(what, done, total)

    def _bar(self, what: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self._open.get(what)
        if bar is None:
            # total == 100: a share of the time (the throughput measurement), not a count of things
            shape = {"bar_format": "{desc}: {percentage:3.0f}%|{bar}| {elapsed}"} if total == 100 else {"unit": "block"}
            bar = self._open[what] = tqdm(total=total, desc=f"petald: {what}", file=self.stream, leave=True,
                                          dynamic_ncols=True, **shape)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self._open[what]

    def _line(self, what: str, done: int, total: int) -> None:
        step = done * PLAIN_STEPS // total
        if step > self._last_step.get(what, 0):
            self._last_step[what] = step
            self.say(f"{what}: {done}/{total} ({100 * done // total}%)")

    def close(self) -> None:
        with self._lock:
            for bar in self._open.values():
                bar.close()
            self._open.clear()
