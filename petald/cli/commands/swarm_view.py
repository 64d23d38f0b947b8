"""``petald swarm``: the swarm map as a table (or JSON), read through the local daemon or by a
short-lived client node of this command's own; ``--watch`` redraws it until Ctrl-C."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import click

from petald.cli.command_errors import run_command
from petald.cli.logs import setup_logging
from petald.cli.options import addresses, socket_path, swarm_key_option, swarm_owner_option

if TYPE_CHECKING:
    from petald.p2pnode.transport.swarm_key import SwarmKey

CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home, erase the screen: a terminal redraws in place


@click.command()
@click.option("--initial-peers", multiple=True, metavar="MULTIADDR",
              help="Any node of the swarm (with /p2p/ID); without it, ask the local daemon.")
@click.option("--socket", default=None, metavar="PATH", help="The local daemon's API socket.")
@click.option("--json", "as_json", is_flag=True, help="Print the map as JSON.")
@click.option("--watch", is_flag=True, help="Redraw the table every --interval seconds until Ctrl-C.")
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between redraws with --watch.")
@click.option("--count", default=None, type=click.IntRange(min=1), help="With --watch: stop after COUNT redraws.")
@swarm_key_option()
@swarm_owner_option()
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def swarm(initial_peers, socket, as_json, watch, interval, count, swarm_key, swarm_owner, debug) -> None:
    """Print every model in the swarm: its servers, spans, state, throughput, and uncovered blocks."""
    setup_logging(False)
    if watch and as_json:
        raise click.UsageError("--watch redraws the table; for JSON, poll GET /v1/swarm or run petald swarm --json")
    if count is not None and not watch:
        raise click.UsageError("--count counts the redraws of --watch: give --watch too")

    def run() -> None:
        import json

        from petald.cli.swarm_table import format_swarm_table

        with _map_reader(initial_peers, socket, swarm_key, swarm_owner) as read:
            if as_json:
                click.echo(json.dumps({"models": read()}, indent=2))
            elif not watch:
                click.echo(format_swarm_table(read()))
            else:
                _watch(read, format_swarm_table, interval, count)

    run_command(run, debug)


def _watch(read: Callable[[], list[dict]], draw: Callable[[list[dict]], str], interval: float,
           count: int | None) -> None:
    """Redraw the map every ``interval`` seconds (``count`` times, or until Ctrl-C, which ends it
    quietly: it is how a watch is left)."""
    terminal = click.get_text_stream("stdout").isatty()
    drawn = 0
    try:
        while count is None or drawn < count:
            began = time.monotonic()
            table = draw(read())
            stamp = time.strftime("%H:%M:%S")
            click.echo(f"{CLEAR_SCREEN if terminal else ''}petald swarm  (every {interval:g} s, {stamp}; "
                       f"Ctrl-C ends it)\n\n{table}")
            drawn += 1
            if count is None or drawn < count:
                time.sleep(max(0.0, interval - (time.monotonic() - began)))
    except KeyboardInterrupt:
        click.echo("")


@contextlib.contextmanager
def _map_reader(initial_peers: tuple[str, ...], socket: str | None, swarm_key: SwarmKey | None,
                swarm_owner: str | None) -> Iterator[Callable[[], list[dict]]]:
    """A way to read the swarm map (JSON form): through the local daemon, or a client node of this
    command's own that joins once and stays for every read."""
    if initial_peers:
        with _node_here(addresses(initial_peers), swarm_key, swarm_owner) as read:
            yield read
        return
    from petald.cli.api.daemon_client import DaemonClient

    daemon = DaemonClient.running_at(socket_path(socket))
    if daemon is None:
        raise click.UsageError(f"no local daemon answers on {socket_path(socket)}: give any node of the "
                               "swarm with --initial-peers MULTIADDR")
    with daemon:
        yield daemon.swarm


@contextlib.contextmanager
def _node_here(initial_peers: list[str], swarm_key: SwarmKey | None,
               swarm_owner: str | None) -> Iterator[Callable[[], list[dict]]]:
    from petald.p2pnode.client.node_thread import NodeThread
    from petald.p2pnode.swarm.swarm_map import read_swarm
    from petald.p2pnode.transport.host import parse_peer_address
    from petald.p2pnode.transport.identity import load_or_create_identity

    list(map(parse_peer_address, initial_peers))  # a bad address is refused before anything is said
    click.echo(f"petald: joining the swarm through {len(initial_peers)} initial peer(s)... (a daemon answers at "
               "once: petald daemon --initial-peers ADDR)", err=True)
    node = NodeThread(load_or_create_identity(None), with_dht=True, swarm_key=swarm_key, swarm_owner=swarm_owner)
    try:
        assert node.dht is not None
        node.call(node.dht.join, initial_peers)

        def read() -> list[dict]:
            assert node.dht is not None
            return [m.to_json() for m in node.call(read_swarm, node.dht)]

        yield read
    finally:
        node.stop()
