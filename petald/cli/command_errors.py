"""How every command ends when something goes wrong: an error a person can act on is one
sentence on stderr (exit 1), anything else is named with a hint to rerun with ``--debug``,
Ctrl-C is exit 130. Usage errors stay click's own (exit 2)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click


def known_errors() -> tuple[type[BaseException], ...]:
    """Errors that carry a message a person can act on (imported lazily: torch is slow to load)."""
    from petald.cli.api.daemon_client import DaemonError
    from petald.kernels.paged_kv_cache import CacheFullError
    from petald.kernels.sources.model_source import ModelSourceError
    from petald.p2pnode.client.distributed_model import ModelMismatchError
    from petald.p2pnode.routing.route import NoRouteError
    from petald.p2pnode.transport.peer_streams import ServerUnavailable
    from petald.protocol.errors import ProtocolError, RemoteError

    return (ModelSourceError, ModelMismatchError, ServerUnavailable, NoRouteError, RemoteError,
            ProtocolError, CacheFullError, DaemonError, ValueError, OSError)


def run_command(fn: Callable[[], None], debug: bool) -> None:
    """Run a command's work; with ``debug``, let an unexpected error's traceback through."""
    try:
        fn()
    except KeyboardInterrupt:
        click.echo("\npetald: interrupted", err=True)
        sys.exit(130)
    except click.ClickException:
        raise  # click prints it as a usage error or a sentence
    except Exception as exc:
        if debug:
            raise
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]  # trio nurseries wrap a single failure in a group
        known = isinstance(exc, known_errors())
        prefix = "error" if known else f"unexpected {type(exc).__name__}"
        click.echo(f"petald: {prefix}: {exc}", err=True)
        if not known:
            click.echo("petald: run again with --debug for the full traceback", err=True)
        sys.exit(1)
