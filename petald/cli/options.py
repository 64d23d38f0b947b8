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
    """--listen, repeatable, for serve and daemon: each a TCP multiaddr, checked as soon as the
    command line is read (before any model is opened)."""

    def check(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
        from multiaddr import Multiaddr

        for value in values:
            try:
                protocols = [p.name for p in Multiaddr(value).protocols()]
            except Exception:
                protocols = []
            if "tcp" not in protocols:
                raise click.BadParameter(f"{value!r} is not a TCP multiaddr: {_listen_hint(value)}")
        return values

    return click.option("--listen", multiple=True, default=[DEFAULT_LISTEN], show_default=True, help=help,
                        callback=check)


def _listen_hint(value: str) -> str:
    """The multiaddr a person most likely meant by ``value`` (HOST:PORT, or a bare port)."""
    host, sep, port = value.rpartition(":")
    if value.isdigit():
        host, port, sep = "0.0.0.0", value, ":"
    host = host.strip("[]")
    if not sep or not port.isdigit() or not host:
        return f"write it like {DEFAULT_LISTEN}"
    if ":" in host:
        return f"write it as /ip6/{host}/tcp/{port}"
    if host.replace(".", "").isdigit():
        return f"write it as /ip4/{host}/tcp/{port}"
    return f"write it as /ip4/ADDRESS/tcp/{port}, with an IP address of this machine for {host}"


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
    """--socket, --socket-group, --http and --api-key, shared by serve and daemon."""
    fn = click.option("--api-key", default=None, metavar="KEY",
                      help="Every request to --http must send 'Authorization: Bearer KEY' (at least 16 "
                           "characters); required when --http is not a loopback address. The socket needs none.")(fn)
    fn = click.option("--http", default=None, metavar="HOST:PORT",
                      help="Also serve the API on TCP (e.g. 127.0.0.1:8080); beyond loopback only with --api-key.")(fn)
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


def api_listen(socket: str | None, socket_group: str | None, http: str | None, command: str,
               say: Callable[[str], None] | None = None, api_key: str | None = None) -> ApiListen | None:
    """Where the API listens; fails now, before any model is loaded or swarm joined, if the socket
    or the --http port is taken, or --http reaches beyond this machine without --api-key. With ``say`` (``petald serve``: several servers may share a
    machine), a default socket another live petald serves is left to it: this one serves without
    the socket, says so once, and returns None if that leaves no API at all. A socket given
    (--socket, PETALD_SOCKET, the config file) that is taken stays an error."""
    from petald.cli.api.bearer_auth import check_api_key
    from petald.cli.api.server import ApiListen, check_http_free, parse_http_address
    from petald.cli.api.unix_socket import SocketInUseError, check_socket_free

    check_api_key(http, parse_http_address(http)[0] if http is not None else None, api_key)
    path: Path | None = socket_path(socket)
    try:
        check_socket_free(path, command)
    except SocketInUseError:
        if socket is not None or say is None:
            raise
        say(f"the local API's default socket {path} is another petald's: this one serves without it "
            "(give --socket PATH for an API of its own)")
        path = None
    if http is not None:
        check_http_free(http)
    return ApiListen(path, http, socket_group, api_key) if path is not None or http is not None else None


def _parsed_by(parser: Callable[[], tuple[Callable[[str], object], type[Exception]]]) -> Callable:
    """A click callback: the option's value parsed (None when not given), an error of the parser's
    a usage error that names the option. ``parser()`` imports lazily (the CLI starts fast)."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> object:
        if not value:
            return None
        read, error = parser()
        try:
            return read(value)
        except error as exc:
            raise click.BadParameter(str(exc)) from None

    return parse


def _swarm_key_file() -> tuple[Callable[[str], object], type[Exception]]:
    from petald.p2pnode.transport.swarm_key import SwarmKeyError, read_swarm_key

    return read_swarm_key, SwarmKeyError


def _owner_id() -> tuple[Callable[[str], object], type[Exception]]:
    from petald.p2pnode.swarm.membership import parse_owner

    return parse_owner, ValueError


def swarm_key_option() -> Callable:
    """--swarm-key FILE (or PETALD_SWARM_KEY): a private swarm's key, read and checked as soon as
    the command line is read; the value is the SwarmKey, or None for the open swarm."""
    return click.option("--swarm-key", default=None, metavar="FILE", callback=_parsed_by(_swarm_key_file),
                        help="Join the private swarm of this key (petald swarm-key FILE makes one): every "
                             "connection proves it first; peers without it are refused.")


def swarm_owner_option(required: bool = False) -> Callable:
    """--swarm-owner ID_OR_FILE: the owner whose signed member list admits peers; the value is the
    owner's peer ID (checked as soon as the command line is read), or None."""
    return click.option("--swarm-owner", default=None, required=required, metavar="ID_OR_FILE",
                        callback=_parsed_by(_owner_id),
                        help="Admit only the peers on this owner's signed member list (its ID, or the .pub "
                             "file petald swarm-owner-key writes); see petald swarm-members.")


def addresses(values: Sequence[str]) -> list[str]:
    """Multiaddrs from repeated options, each of which may hold several (space or comma separated)."""
    return [a for value in values for a in value.replace(",", " ").split()]


def from_command_line(ctx: click.Context, *names: str) -> bool:
    """Whether any of these parameters was typed (not taken from a default, the environment or a file)."""
    return any(ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE for n in names)
