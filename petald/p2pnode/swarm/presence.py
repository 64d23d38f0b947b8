"""A server's presence in the swarm: its signed record, kept fresh on a period.

``ServerPresence`` owns what the server says about itself (state, span, throughput,
free cache) and republishes it every ``period`` seconds with an expiry a few periods
ahead, so that a server that vanishes drops out of every lookup within that time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from petald.p2pnode.swarm.dht import SERVERS_KEY, SwarmDHT, block_key, model_key
from petald.p2pnode.transport.host import full_addresses
from petald.protocol.announcement import MAX_RECORD_LIFETIME_S, ServerAnnouncement
from petald.protocol.messages import ServerInfo

log = logging.getLogger(__name__)

EXPIRY_PERIODS = 4  # a record outlives three missed republications
MIN_EXPIRY_S = 30.0
REPROVIDE_EVERY = 5  # provider records are re-sent every this many periods (and on a span change)


def record_lifetime(period: float) -> float:
    """How long a record republished every ``period`` seconds lives: a few periods, within what
    every node accepts (``MAX_RECORD_LIFETIME_S``)."""
    return min(MAX_RECORD_LIFETIME_S, max(MIN_EXPIRY_S, EXPIRY_PERIODS * period))


class ServerPresence:
    def __init__(self, dht: SwarmDHT, info: Callable[[], ServerInfo], *, period: float = 30.0,
                 network_mbps: float = 0.0, addresses: Callable[[], list[str]] | None = None):
        """``info()``: what the server holds now (span, dtype, quantization, free cache, adapters);
        ``addresses()``: where it is reached (default: the host's own addresses)."""
        self.dht, self.info = dht, info
        self.addresses = addresses or (lambda: full_addresses(dht.host))
        self.period, self.network_mbps = period, network_mbps
        self.state = "joining"
        self.inference_rps = 0.0
        self.forward_tps = 0.0
        self._provided: tuple[str, int, int] | None = None
        self._publishes = 0

    def record(self, state: str | None = None) -> ServerAnnouncement:
        info, now = self.info(), time.time()
        return ServerAnnouncement(
            peer_id=self.dht.peer_id, addresses=self.addresses()[:8],
            state=state or self.state, model_id=info.model_id, fingerprint=info.fingerprint,
            num_blocks=info.num_blocks, start=info.start, end=info.end, dtype=info.dtype, quant=info.quant,
            max_length=info.max_length, free_cache_tokens=info.free_cache_tokens,
            inference_rps=self.inference_rps, forward_tps=self.forward_tps, network_mbps=self.network_mbps,
            issued_at=now, expires_at=now + record_lifetime(self.period),
            version=info.version, wire_version=info.wire_version, adapters=info.adapters,
        )

    async def publish(self, state: str | None = None) -> ServerAnnouncement:
        """Put the current record into the DHT now; provide its block keys when they changed."""
        if state is not None:
            self.state = state
        record = self.record()
        span = (record.model_id, record.start, record.end)
        keys: list[bytes] = []
        if self.state != "offline" and (span != self._provided or self._publishes % REPROVIDE_EVERY == 0):
            # The model key first: clients look it up before any block key, and a receiver takes
            # only 10 provider records per peer per 10 s (the block keys are looked up as a fallback).
            keys = [model_key(record.model_id), *(block_key(record.model_id, b) for b in range(record.start, record.end)),
                    SERVERS_KEY]
            self._provided = span
        self._publishes += 1
        await self.dht.publish(record, keys)
        return record

    async def keep_fresh(self) -> None:
        """Republish every period until cancelled."""
        while True:
            await trio.sleep(self.period)
            try:
                await self.publish()
            except Exception as exc:  # a failed round is retried next period
                log.warning("could not republish this server's record: %s", exc)
