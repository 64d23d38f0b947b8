"""Which servers a client avoids for now: each failure bans a server for a while, longer each time.

A server that fails once (killed, restarted, moved) is usually fine again soon; one that keeps
failing is probably broken or lying, so its ban doubles up to a cap. A step that succeeds
through a server forgets its failures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

FIRST_BAN_S = 10.0
MAX_BAN_S = 300.0


@dataclass
class _Record:
    failures: int
    until: float


class ServerBans:
    def __init__(self, first_ban: float = FIRST_BAN_S, max_ban: float = MAX_BAN_S,
                 clock: Callable[[], float] = time.monotonic):
        self.first_ban, self.max_ban, self.clock = first_ban, max_ban, clock
        self._records: dict[str, _Record] = {}

    def ban(self, peer_id: str) -> float:
        """Record a failure of ``peer_id``; returns the length of its ban in seconds."""
        record = self._records.get(peer_id)
        failures = 1 if record is None else record.failures + 1
        length = min(self.first_ban * 2 ** (failures - 1), self.max_ban)
        self._records[peer_id] = _Record(failures, self.clock() + length)
        return length

    def is_banned(self, peer_id: str) -> bool:
        record = self._records.get(peer_id)
        return record is not None and record.until > self.clock()

    def has_failed(self, peer_id: str) -> bool:
        """It failed, and has not answered correctly since (it may be dead even after its ban)."""
        return peer_id in self._records

    def forgive(self, peer_id: str) -> None:
        """The server answered correctly: its next failure starts from the first ban again."""
        self._records.pop(peer_id, None)
