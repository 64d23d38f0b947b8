"""``petald swarm``: the swarm map as a table (or JSON), read through the local daemon or by a
short-lived client node of this command's own."""

from __future__ import annotations

import click

from petald.cli.command_errors import run_command
from petald.cli.logs import setup_logging
from petald.cli.options import addresses, socket_path


@click.command()
@click.option("--initial-peers", multiple=True, metavar="MULTIADDR",
              help="Any node of the swarm (with /p2p/ID); without it, ask the local daemon.")
@click.option("--socket", default=None, metavar="PATH", help="The local daemon's API socket.")
@click.option("--json", "as_json", is_flag=True, help="Print the map as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def swarm(initial_peers, socket, as_json, debug) -> None:
    """Print every model in the swarm: its servers, spans, state, throughput, and uncovered blocks."""
    setup_logging(False)

    def run() -> None:
        import json

        from petald.cli.swarm_table import format_swarm_table

        if initial_peers:
            maps = _read_swarm_here(addresses(initial_peers))
        else:
            from petald.cli.api.daemon_client import DaemonClient

            daemon = DaemonClient.running_at(socket_path(socket))
            if daemon is None:
                raise click.UsageError(f"no local daemon answers on {socket_path(socket)}: give any node of the "
                                       "swarm with --initial-peers MULTIADDR")
            with daemon:
                maps = daemon.swarm()
        if as_json:
            click.echo(json.dumps({"models": maps}, indent=2))
        else:
            click.echo(format_swarm_table(maps))

    run_command(run, debug)


def _read_swarm_here(initial_peers: list[str]) -> list[dict]:
    """The swarm map (JSON form) read by a short-lived client node of this process."""
    from petald.p2pnode.client.node_thread import NodeThread
    from petald.p2pnode.swarm.swarm_map import read_swarm
    from petald.p2pnode.transport.identity import load_or_create_identity

    node = NodeThread(load_or_create_identity(None), with_dht=True)
    try:
        async def look() -> list:
            assert node.dht is not None
            await node.dht.join(initial_peers)
            return await read_swarm(node.dht)

        models = node.call(look)
    finally:
        node.stop()
    return [m.to_json() for m in models]
