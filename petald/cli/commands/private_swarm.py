"""``petald swarm-key FILE``: a new private swarm's key (docs/security.md, "Private swarms")."""

from __future__ import annotations

import click

from petald.cli.command_errors import run_command


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
