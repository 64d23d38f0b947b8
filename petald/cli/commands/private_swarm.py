"""A private swarm's keys and members (docs/security.md): ``petald swarm-key FILE`` (the key every
node holds), ``petald swarm-owner-key FILE`` (the owner's signing key) and ``petald swarm-members
add|remove|list`` (the owner's signed member list, in the DHT)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from petald.cli.command_errors import run_command
from petald.cli.options import addresses, swarm_key_option, swarm_owner_option

if TYPE_CHECKING:
    from petald.p2pnode.transport.swarm_key import SwarmKey
    from petald.protocol.member_list import MemberList


@click.command("swarm-key")
@click.argument("file", type=click.Path(dir_okay=False))
def swarm_key_command(file: str) -> None:
    """Write a new random swarm key to FILE (mode 0600; an existing file is never overwritten).
    Give every node of the private swarm --swarm-key FILE (or PETALD_SWARM_KEY=FILE)."""
    from petald.p2pnode.transport.swarm_key import SwarmKeyError, write_new_swarm_key

    def run() -> None:
        try:
            key = write_new_swarm_key(file)
        except SwarmKeyError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"petald: wrote a new swarm key to {file} (fingerprint {key.fingerprint}); copy it to every "
                   f"node of the swarm and start each with --swarm-key {file}", err=True)

    run_command(run, False)


@click.command("swarm-owner-key")
@click.argument("file", type=click.Path(dir_okay=False))
def swarm_owner_key_command(file: str) -> None:
    """Write a new swarm owner key to FILE (mode 0600, never overwritten) and its owner ID to
    FILE.pub; nodes are started with --swarm-owner FILE.pub (or the ID) and admit the peers on the
    member list this key signs (petald swarm-members)."""
    from pathlib import Path

    from petald.p2pnode.transport.identity import load_or_create_identity, peer_id_of

    def run() -> None:
        path = Path(file).expanduser()
        public = path.with_name(path.name + ".pub")
        for taken in (path, public):
            if taken.exists():
                raise click.ClickException(f"{taken} already exists: an owner key is never overwritten (the "
                                           "swarm's nodes trust it); remove it first or write elsewhere")
        owner = peer_id_of(load_or_create_identity(path))
        public.write_text(owner + "\n")
        click.echo(owner)
        click.echo(f"petald: wrote the swarm owner key to {path} (keep it private) and its owner ID to {public}; "
                   f"start every node with --swarm-owner {public}, then admit peers with petald swarm-members "
                   f"add PEER_ID --owner-key {path} --initial-peers ADDR", err=True)

    run_command(run, False)


def _members_options(fn: Callable) -> Callable:
    for decorator in reversed([
        click.option("--initial-peers", multiple=True, required=True, metavar="MULTIADDR",
                     help="Any node of the swarm (with /p2p/ID)."),
        swarm_key_option(),
        click.option("--debug", is_flag=True, help="Show tracebacks."),
    ]):
        fn = decorator(fn)
    return fn


@click.group("swarm-members")
def swarm_members() -> None:
    """The swarm owner's signed member list: who may use a swarm started with --swarm-owner."""


@swarm_members.command("list")
@swarm_owner_option(required=True)
@_members_options
def members_list(swarm_owner, initial_peers, swarm_key, debug) -> None:
    """Print the newest member list the swarm holds (version, when it was signed, peer IDs)."""
    def run() -> None:
        members = _with_member_list(addresses(initial_peers), swarm_key, swarm_owner, None, None)
        click.echo(f"version {members.version}, signed {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(members.issued_at))} "
                   f"UTC, {len(members.members)} members")
        for peer in members.members:
            click.echo(peer)

    run_command(run, debug)


def _edit_command(name: str, verb: str, change: Callable[[set[str], set[str]], set[str]]) -> None:
    @swarm_members.command(name, help=f"{verb} PEER_IDS and publish the list as a new version, signed by --owner-key.")
    @click.argument("peer_ids", nargs=-1, required=True)
    @click.option("--owner-key", required=True, type=click.Path(dir_okay=False, exists=True),
                  help="The owner key file (petald swarm-owner-key).")
    @_members_options
    def edit(peer_ids, owner_key, initial_peers, swarm_key, debug) -> None:
        from petald.p2pnode.swarm.membership import is_key_peer_id

        for peer in peer_ids:
            if not is_key_peer_id(peer):
                raise click.BadParameter(f"{peer!r} is not a peer ID (12D3KooW..., as a node prints)")

        def run() -> None:
            from petald.p2pnode.transport.identity import load_or_create_identity, peer_id_of

            key = load_or_create_identity(owner_key)
            members = _with_member_list(addresses(initial_peers), swarm_key, peer_id_of(key), key,
                                        lambda old: change(old, set(peer_ids)))
            click.echo(f"petald: published member list version {members.version} with {len(members.members)} "
                       "members", err=True)

        run_command(run, debug)


_edit_command("add", "Admit", lambda old, given: old | given)
_edit_command("remove", "Shut out", lambda old, given: old - given)


def _with_member_list(initial_peers: list[str], swarm_key: SwarmKey | None, owner: str, owner_key: object,
                      change: Callable[[set[str]], set[str]] | None) -> MemberList:
    """Join the swarm, read the newest member list; with ``change``, sign and publish its next version."""
    from petald.p2pnode.client.node_thread import NodeThread
    from petald.p2pnode.swarm.membership import sign_member_list
    from petald.p2pnode.transport.host import parse_peer_address
    from petald.p2pnode.transport.identity import load_or_create_identity
    from petald.protocol.member_list import MemberList

    list(map(parse_peer_address, initial_peers))  # a bad address is refused before anything is dialled
    node = NodeThread(load_or_create_identity(None), with_dht=True, swarm_key=swarm_key, swarm_owner=owner)
    try:
        assert node.dht is not None and node.members is not None
        node.call(node.dht.join, initial_peers)  # which reads the list
        current = node.members.current
        if change is None:
            if current is None:
                raise click.ClickException(f"the swarm holds no member list of the owner {owner} yet (petald "
                                           "swarm-members add PEER_ID --owner-key FILE publishes one)")
            return current
        new = MemberList(owner, (current.version if current else 0) + 1, time.time(),
                         tuple(change(set(current.members) if current else set())))
        stored = node.call(node.members.publish, node.dht, sign_member_list(new, owner_key))  # type: ignore[arg-type]
        if not stored:
            raise click.ClickException("no node of the swarm took the new member list: are the initial peers "
                                       "servers that answer DHT requests?")
        return new
    finally:
        node.stop()
