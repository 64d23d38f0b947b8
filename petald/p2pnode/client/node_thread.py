"""A libp2p host on its own trio loop in a background thread, for synchronous callers.

The Python API and the CLI client are ordinary blocking code that runs torch
(embeddings, LM head, sampling) in the caller's thread; every network wait runs
on this loop, reached through ``call``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair

from petald.p2pnode.swarm.dht import SwarmDHT
from petald.p2pnode.swarm.membership import SwarmMembership
from petald.p2pnode.transport.direct_upgrade import direct_upgrades
from petald.p2pnode.transport.host import DEFAULT_LISTEN, quiet_libp2p_logs, running_host
from petald.p2pnode.transport.swarm_key import SwarmKey

T = TypeVar("T")


class NodeThread:
    def __init__(self, key_pair: KeyPair, listen: Sequence[str] = (DEFAULT_LISTEN,), start_timeout: float = 30.0,
                 with_dht: bool = False, direct_upgrade: bool = False, swarm_key: SwarmKey | None = None,
                 swarm_owner: str | None = None):
        """``direct_upgrade``: run DCUtR (transport/direct_upgrade) on relayed connections;
        ``swarm_key``: a private swarm's (transport/private_network); ``swarm_owner``: whose member
        list the DHT's lookups go by (swarm/membership)."""
        quiet_libp2p_logs()
        self._key_pair, self._listen, self._with_dht = key_pair, list(listen), with_dht
        self._direct_upgrade, self._swarm_key = direct_upgrade, swarm_key
        self.members = SwarmMembership(swarm_owner) if swarm_owner else None
        self.dht: SwarmDHT | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.host: IHost | None = None
        self._thread = threading.Thread(target=self._run, name="petald-node", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout):
            raise RuntimeError(f"the libp2p host did not start within {start_timeout:.0f} s")
        if self._error is not None:
            raise RuntimeError(f"the libp2p host failed to start: {self._error}") from self._error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the thread that started us
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        async with running_host(self._key_pair, self._listen, swarm_key=self._swarm_key) as host, contextlib.AsyncExitStack() as stack, \
                direct_upgrades(host, self._direct_upgrade):
            if self._with_dht:  # a client node: it looks things up but stores nothing for others
                self.dht = await stack.enter_async_context(
                    SwarmDHT(host, self._key_pair, server_mode=False, members=self.members).running())
            self.host = host
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` on the node's loop and return its result here."""
        if self._token is None:
            raise RuntimeError("the node is not running")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def stop(self, timeout: float = 10.0) -> None:
        if self._token is not None and self._stop is not None:
            try:
                self._token.run_sync_soon(self._stop.set)
            except trio.RunFinishedError:
                pass
            self._token = None
        self._thread.join(timeout)
