"""``petald install-service``: a systemd unit that runs ``petald serve`` (or ``daemon``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

# Where the unit's sandboxing (PrivateTmp=yes) gives the service an empty directory of its own.
SANDBOX_HIDDEN = ("/tmp/", "/var/tmp/")


def _check_arguments(args: list[str]) -> None:
    """Refuse now what ``petald serve ARGS`` (or ``daemon``) would refuse at its first start: the
    arguments are parsed by the command itself (types, --listen, --announce), and a server must be
    told which swarm to join."""
    from petald.cli.commands.serving import daemon, serve
    from petald.cli.systemd.unit import ROLES

    role = args[0] if args and args[0] in ROLES else "serve"
    rest = args[1:] if args and args[0] in ROLES else args
    command = serve if role == "serve" else daemon
    try:
        command.make_context(role, list(rest), default_map={})
    except click.exceptions.Exit:
        return  # --help among them: the command would print it and stop
    except click.ClickException as exc:
        raise click.UsageError(f"petald {role} would refuse these arguments: {exc.format_message()}") from None
    joins = any(a == "--initial-peers" or a.startswith("--initial-peers=") for a in rest)
    if not joins and not (role == "serve" and "--new-swarm" in rest):
        what = "--initial-peers ADDR (any node of the swarm)" + (", or --new-swarm" if role == "serve" else "")
        raise click.UsageError(f"petald {role} needs to know its swarm: add {what} after --")


@click.command("install-service", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--system", is_flag=True, help="A system unit in /etc/systemd/system (run as root) instead of a "
                                              "user unit in ~/.config/systemd/user.")
@click.option("--user", "run_as", default=None, help="With --system: the account petald runs as (default: you).")
@click.option("--name", default="petald.service", show_default=True, help="Unit name (one per server).")
@click.option("--print", "print_only", is_flag=True, help="Print the unit instead of writing it.")
@click.option("--output", default=None, type=click.Path(dir_okay=False), help="Write the unit here instead.")
def install_service(args, system, run_as, name, print_only, output) -> None:
    """Write a systemd unit that runs `petald serve ARGS` (or `petald daemon ARGS`), e.g.
    petald install-service -- --initial-peers ADDR --blocks auto"""
    from petald.cli.systemd.unit import unit_path, unit_text

    if not name.endswith(".service"):
        name += ".service"
    _check_arguments(list(args))
    python = sys.executable
    if python.startswith(SANDBOX_HIDDEN):
        click.echo(f"petald: warning: the unit runs {python}, under {python.split('/')[1]}/, which its "
                   "PrivateTmp=yes hides from the service: install petald in a virtualenv elsewhere first", err=True)
    text = unit_text(list(args), system, run_as, python)
    if print_only:
        click.echo(text, nl=False)
        return
    path = Path(output) if output else unit_path(system, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except PermissionError:
        raise click.ClickException(f"cannot write {path}: run as root for --system, or use --output") from None
    click.echo(f"petald: wrote {path}")
    manager = "systemctl" if system else "systemctl --user"
    click.echo(f"petald: start it with: {manager} daemon-reload && {manager} enable --now {name}")
    click.echo(f"petald: its log: journalctl {'' if system else '--user '}-u {name} -f")
    if not system:
        click.echo("petald: to keep it running after you log out: loginctl enable-linger")
