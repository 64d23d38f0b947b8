"""Options several commands take, and how their values are read: the LM head's storage, where a
node listens, the local API's socket and TCP address, lists of multiaddrs, whether a value was typed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from petald.vocabulary import DEFAULT_LISTEN, HEAD_QUANT_CHOICES

if TYPE_CHECKING:
    from petald.cli.api.server import ApiListen


def head_quant_option() -> Callable:
    return click.option("--head-quant", default="none", show_default=True, type=click.Choice(HEAD_QUANT_CHOICES),
                        help="How the local LM head is stored: bf16 is faster on CPUs with native bfloat16 "
                             "(AVX512-BF16, AMX); none (float32) is the reference; auto measures and takes "
                             "the fastest with >= 97% top-1 agreement.")


def listen_option(help: str) -> Callable:
    """--listen, repeatable, for serve and daemon."""
    return click.option("--listen", multiple=True, default=[DEFAULT_LISTEN], show_default=True, help=help)


def announce_option() -> Callable:
    """--announce, repeatable, for serve: checked as soon as the command line is read."""

    def check(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
        from petald.p2pnode.transport.announced_addresses import AnnounceError, parse_announce

        for value in values:
            try:
                parse_announce(value)
            except AnnounceError as exc:
                raise click.BadParameter(str(exc)) from None
        return list(values)

    return click.option("--announce", multiple=True, metavar="MULTIADDR", callback=check,
                        help="Address others reach this server at, when it differs from --listen (port "
                             "forwarding, a proxy), e.g. /ip4/203.0.113.5/tcp/31337 (repeatable). Announced "
                             "instead of the listen addresses.")


def api_options(fn: Callable) -> Callable:
    """--socket, --socket-group and --http, shared by serve and daemon."""
    fn = click.option("--http", default=None, metavar="HOST:PORT",
                      help="Also serve the API on TCP (e.g. 127.0.0.1:8080). It has no authentication.")(fn)
    fn = click.option("--socket-group", default=None, metavar="GROUP",
                      help="Let this group use the API socket too (mode 0660 instead of 0600).")(fn)
    fn = click.option("--socket", default=None, metavar="PATH",
                      help="Unix socket of the local API (default: $XDG_RUNTIME_DIR/petald/api.sock, "
                           "else ~/.petald/api.sock).")(fn)
    return fn


def socket_path(socket: str | None) -> Path:
    """The local API's socket: ``--socket``, else the default one."""
    from petald.cli.api.unix_socket import default_socket_path

    return Path(socket).expanduser() if socket else default_socket_path()


def api_listen(socket: str | None, socket_group: str | None, http: str | None) -> ApiListen:
    """Where the API listens; fails now, before any model is loaded, if the socket is taken."""
    from petald.cli.api.server import ApiListen, parse_http_address
    from petald.cli.api.unix_socket import check_socket_free

    path = socket_path(socket)
    check_socket_free(path)
    if http is not None:
        parse_http_address(http)
    return ApiListen(path, http, socket_group)


def addresses(values: Sequence[str]) -> list[str]:
    """Multiaddrs from repeated options, each of which may hold several (space or comma separated)."""
    return [a for value in values for a in value.replace(",", " ").split()]


def from_command_line(ctx: click.Context, *names: str) -> bool:
    """Whether any of these parameters was typed (not taken from a default, the environment or a file)."""
    return any(ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE for n in names)
