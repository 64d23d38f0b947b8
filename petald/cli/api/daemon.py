"""The daemon's local API, in the two processes that serve it.

- ``petald serve``: the server runs :func:`api_beside_server` in its nursery once its first
  span is online; the API's DistributedModel joins the swarm through the server's own address.
- ``petald daemon``: :func:`run_client_daemon` joins the swarm without serving blocks (a
  client-mode DHT node) and serves only the API.

Either way the API's DistributedModel is created by the first request that needs one
(``ModelBackend``), and systemd hears ``READY=1`` once the API listens.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost

from petald.cli.api.backend import ModelBackend
from petald.cli.api.routes import ApiContext, make_app
from petald.cli.api.server import ApiListen, serve_api
from petald.cli.systemd import notify as systemd_notify
from petald.kernels.sources.model_source import ModelSource
from petald.kernels.sources.open_source import open_source
from petald.p2pnode.client.client_options import ClientOptions
from petald.p2pnode.swarm.dht import SwarmDHT
from petald.p2pnode.swarm.membership import SwarmMembership
from petald.p2pnode.swarm.swarm_map import read_swarm
from petald.p2pnode.transport.announced_addresses import address_plan
from petald.p2pnode.transport.host import (
    DEFAULT_LISTEN,
    full_addresses,
    local_addresses,
    quiet_libp2p_logs,
    running_host,
)
from petald.p2pnode.transport.identity import load_or_create_identity, peer_id_of
from petald.p2pnode.transport.node_metrics import NodeMetrics
from petald.p2pnode.transport.peer_streams import ServerUnavailable
from petald.p2pnode.transport.swarm_key import SwarmKey

log = logging.getLogger(__name__)


def api_beside_server(listen: ApiListen | None, model: str | None, announce: Callable[[str], None],
                      head_quant: str = "none", metrics: NodeMetrics | None = None,
                      swarm_key: SwarmKey | None = None) -> Callable[[IHost, SwarmDHT], Awaitable[None]]:
    """The task ``petald serve`` starts once it is routable: the API (unless ``listen`` is None)
    and systemd's readiness. ``model`` is opened again here (cheap: the fingerprint is cached)
    so that the server's own loading code stays as it is. ``head_quant``: how the API's model
    stores its LM head (``ClientHead``). ``metrics``: the server's (``ServeOptions.metrics``), which the
    API's model counts into too and ``GET /metrics`` shows. ``swarm_key``: the server's, which the
    API's model (a client node of its own) needs to reach it in a private swarm."""
    metrics = metrics or NodeMetrics()

    async def run(host: IHost, dht: SwarmDHT) -> None:
        try:
            if listen is None:
                systemd_notify.notify("READY=1", "STATUS=serving blocks (no local API)")
                await trio.sleep_forever()
            addresses = full_addresses(host)
            source = await trio.to_thread.run_sync(open_source, model)
            # The API's client joins through this server at an address of this machine: what the
            # server announces (--announce: a forwarded port, a proxy) may not loop back here.
            backend = ModelBackend(source, local_addresses(host)[:1], head_quant=head_quant, metrics=metrics,
                                   options=ClientOptions(swarm_key=swarm_key))
            context = ApiContext(backend, lambda: read_swarm(dht), "server",
                                 details=lambda: {"peer_id": dht.peer_id, "addresses": addresses}, metrics=metrics)
            await _serve(context, listen, announce)
        finally:
            systemd_notify.notify("STOPPING=1")

    return run


async def _serve(context: ApiContext, listen: ApiListen, announce: Callable[[str], None],
                 stop: trio.Event | None = None) -> None:
    async with context.backend.running(), trio.open_nursery() as nursery:
        urls = await nursery.start(serve_api, make_app(context), listen)
        for url in urls:
            announce(f"local API on {url}")
        systemd_notify.notify("READY=1", f"STATUS=serving the local API on {', '.join(urls)}")
        if stop is None:
            await trio.sleep_forever()
        await stop.wait()
        nursery.cancel_scope.cancel()


@dataclass
class DaemonOptions:
    initial_peers: list[str]
    listen_api: ApiListen
    listen: list[str] = field(default_factory=lambda: [DEFAULT_LISTEN])
    identity: str | None = None
    head_quant: str = "none"  # how the API's model stores its LM head (ClientHead)
    swarm_key: SwarmKey | None = None  # a private swarm's (transport/private_network.py)
    swarm_owner: str | None = None  # whose signed member list admits peers (swarm/membership.py)


def run_client_daemon(options: DaemonOptions, source: ModelSource, announce: Callable[[str], None]) -> None:
    """Join the swarm as a client node and serve the local API until SIGINT or SIGTERM.
    ``options.initial_peers`` names at least one node (``petald daemon`` refuses none)."""
    quiet_libp2p_logs()
    # With a member list, the identity is the API's client node's (the one servers must admit);
    # this node only reads the DHT, which servers answer for anyone, so it needs none of its own.
    key_pair = load_or_create_identity(None if options.swarm_owner else options.identity)
    client = ClientOptions(swarm_key=options.swarm_key, swarm_owner=options.swarm_owner,
                           identity_file=options.identity if options.swarm_owner else None)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            plan = address_plan(options.listen, options.initial_peers)
            async with running_host(key_pair, options.listen, addresses=plan, swarm_key=options.swarm_key) as host:
                members = SwarmMembership(options.swarm_owner) if options.swarm_owner else None
                dht = SwarmDHT(host, key_pair, server_mode=False, members=members)
                async with dht.running():
                    joined = await dht.join(options.initial_peers)
                    if not joined:
                        raise ServerUnavailable(f"none of the initial peers answered: {_listing(options.initial_peers)}")
                    announce(f"joined the swarm through {joined} of {len(options.initial_peers)} initial peers "
                             f"as a client for {source.identity.model_id}")
                    metrics = NodeMetrics()
                    metrics.watch(metrics.dht_records, dht.stored_records)
                    backend = ModelBackend(source, options.initial_peers, head_quant=options.head_quant,
                                           options=client, metrics=metrics)
                    if options.swarm_owner and options.identity:
                        client_id = peer_id_of(load_or_create_identity(options.identity))
                        announce(f"the API's client node is peer {client_id}: the swarm owner admits it with "
                                 f"petald swarm-members add {client_id}")
                    context = ApiContext(backend, lambda: read_swarm(dht), "client",
                                         details=lambda: {"peer_id": dht.peer_id}, metrics=metrics)
                    stop = trio.Event()

                    async def wait_for_signal() -> None:
                        async for signum in signals:
                            announce(f"received {signal.Signals(signum).name}, shutting down")
                            systemd_notify.notify("STOPPING=1")
                            stop.set()
                            return

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(wait_for_signal)
                        await _serve(context, options.listen_api, announce, stop)
                        nursery.cancel_scope.cancel()

    trio.run(main)
    announce("stopped")


def _listing(addresses: Sequence[str]) -> str:
    return ", ".join(addresses)
