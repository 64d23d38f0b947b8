"""``petald config show``: the effective configuration, each value with where it came from."""

from __future__ import annotations

import click


@click.group()
def config() -> None:
    """The effective configuration: flags > PETALD_* environment > config file > defaults."""


@config.command("show")
@click.argument("command", required=False)
@click.pass_context
def config_show(ctx, command) -> None:
    """Print the effective configuration (of COMMAND, or of every command) as TOML, each value
    with where it came from."""
    from petald.cli.config import configurable_commands, describe_effective

    path, settings = ctx.find_root().meta["petald.config"]
    root = ctx.find_root().command
    assert isinstance(root, click.Group)
    if command is not None and command not in configurable_commands(root):
        raise click.UsageError(f"no command {command!r}; commands: {', '.join(configurable_commands(root))}")
    click.echo(describe_effective(root, settings, path, path.exists(), command), nl=False)
