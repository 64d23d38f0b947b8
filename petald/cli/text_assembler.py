"""Tokens into text a reader can be shown as they arrive: what the local API streams and what
``petald generate`` and ``petald chat`` print come from the same rule, so that they agree."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextAssembler:
    """Turns tokens into text deltas: holds back an incomplete UTF-8 character and any suffix
    that could still become a stop string, and cuts the text where a stop string begins."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            text = text[:cut]
            safe = len(text)
        elif text.endswith("\ufffd"):
            return ""
        else:
            safe = len(text) - self._possible_stop_prefix(text)
        delta = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta

    def tail(self) -> str:
        """At the end, whatever was held back for a stop string that never completed."""
        if self.stopped:
            return ""
        text = self.decode(self.ids).rstrip("\ufffd")
        return text[self.emitted:]

    def _possible_stop_prefix(self, text: str) -> int:
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if s.startswith(text[-n:]):
                    longest = n
                    break
        return longest
