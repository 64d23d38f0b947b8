"""Serving the local API with Hypercorn's trio worker, on the daemon's own trio loop.

The Unix socket is bound here, not by Hypercorn (which would unlink a live daemon's socket
without asking), and handed to Hypercorn as ``fd://``; ``--http HOST:PORT`` adds a TCP
listener that Hypercorn binds itself, which needs ``--api-key`` unless it is on loopback
(``bearer_auth.py``).
"""

from __future__ import annotations

import logging
import socket
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette

from petald.cli.api.bearer_auth import BearerAuth, check_api_key
from petald.cli.api.unix_socket import claim_socket, release_socket

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 3.0


@dataclass
class ApiListen:
    """Where to serve: a Unix socket path (or None), and optionally ``HOST:PORT`` on TCP."""
    socket_path: Path | None
    http: str | None = None
    socket_group: str | None = None
    api_key: str | None = None  # every request over TCP must carry it (bearer_auth.py)


def parse_http_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def check_http_free(text: str) -> None:
    """Refuse ``--http HOST:PORT`` now if the port is taken, before a server loads its blocks or
    joins the swarm (Hypercorn would find out only then)."""
    host, port = parse_http_address(text)
    if port == 0:
        return  # any free port: the system picks one
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Hypercorn binds: TIME_WAIT is no user
            probe.bind(address)
    except OSError as exc:
        raise OSError(f"--http {text}: cannot listen there ({exc.strerror or exc}): another petald or another "
                      "program holds the port; choose another --http port, or stop what holds it") from None


async def serve_api(app: Starlette, listen: ApiListen, *,
                    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` until cancelled; ``task_status.started`` gets the URLs it listens on."""
    config = Config()
    config.accesslog = None
    # Hypercorn's own logger, so that its INFO lines ("Running on ...") follow petald's log level;
    # petald announces the addresses itself.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = GRACEFUL_SHUTDOWN_S
    config.include_server_header = False
    claimed: tuple[socket.socket, int] | None = None
    binds = []
    if listen.socket_path is not None:
        claimed = claim_socket(listen.socket_path, listen.socket_group)
        binds.append(f"fd://{claimed[0].fileno()}")
    if listen.http is not None:
        host, port = parse_http_address(listen.http)
        check_api_key(listen.http, host, listen.api_key)  # the CLI checked already; a caller of this may not have
        binds.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    config.bind = binds
    if listen.api_key is not None:
        app = BearerAuth(app, listen.api_key)  # type: ignore[assignment]

    try:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(_serve_with_status, app, config)
            # Hypercorn names them http://unix:PATH and http://HOST:PORT (the port bound, if 0 was asked).
            task_status.started([u.removeprefix("http://") if "unix:" in u else u for u in urls])
    finally:
        if claimed is not None:
            sock, inode = claimed
            release_socket(listen.socket_path, inode)  # type: ignore[arg-type]
            with suppress(OSError):
                sock.close()


async def _serve_with_status(app: Starlette, config: Config,
                             task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    await serve(app, config, task_status=task_status)  # type: ignore[arg-type]
