"""``petald``: serve blocks, generate through a chain of servers, or run a local demo swarm.

This module is the command group and its ``--config`` option; each command lives in
``petald.cli.commands`` by what it does, and is added here. No module of petald imports this one:
it runs as ``python -m petald.cli.main`` too (how servers are started as processes), where a
command importing it back would get a second copy of the group. So the commands' shared pieces
live in modules of their own (``options``, ``command_errors``, ``logs``).
"""

from __future__ import annotations

import click

from petald.cli.commands.config_show import config
from petald.cli.commands.demo import demo
from petald.cli.commands.generating import chat, generate
from petald.cli.commands.install_service import install_service
from petald.cli.commands.private_swarm import (
    swarm_key_command,
    swarm_members,
    swarm_owner_key_command,
)
from petald.cli.commands.serving import daemon, serve
from petald.cli.commands.swarm_view import swarm


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="petald")
@click.option("--config", "config_file", default=None, metavar="PATH",
              help="TOML config file (default: $PETALD_CONFIG, else $XDG_CONFIG_HOME/petald/config.toml, "
                   "else ~/.config/petald/config.toml). Precedence: flags > PETALD_* environment > file > defaults.")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None) -> None:
    """petald: run large language models BitTorrent-style."""
    from petald.cli.config import config_path, default_map, read_config_file, resolve_settings

    path, required = config_path(config_file)
    assert isinstance(ctx.command, click.Group)
    settings = resolve_settings(ctx.command, read_config_file(path, required), path)
    ctx.default_map = default_map(ctx.command, settings)
    ctx.meta["petald.config"] = (path, settings)


for command in (serve, generate, chat, swarm, daemon, config, install_service, demo, swarm_key_command,
                swarm_owner_key_command, swarm_members):
    cli.add_command(command)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
