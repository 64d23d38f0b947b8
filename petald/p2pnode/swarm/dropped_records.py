"""Why a DHT record was dropped, said once per record: lookups meet the same stale copy every
second while a client waits for servers, and the log must not repeat it each time."""

from __future__ import annotations

import logging

log = logging.getLogger("petald.p2pnode.swarm.dht")

MAX_REMEMBERED = 1024  # records told of; past this the memory starts over (a record may be told again)


class DroppedRecords:
    def __init__(self) -> None:
        self._told: set[bytes] = set()

    def drop(self, value: bytes, reason: object) -> None:
        """Log ``reason`` at INFO the first time ``value`` (a record's bytes) is dropped, DEBUG after."""
        if value in self._told:
            log.debug("dropping a record again: %s", reason)
            return
        if len(self._told) >= MAX_REMEMBERED:
            self._told.clear()
        self._told.add(value)
        log.info("dropping a record: %s", reason)
