"""The dashboard: ``GET /`` is one self-contained HTML page (``dashboard.html``, package data: no
external assets, works offline) whose script polls ``GET /petald/v1/node`` (this node's figures,
every 2 s) and ``GET /v1/swarm`` (the swarm's map, every 10 s: a map read asks the DHT)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

if TYPE_CHECKING:
    from petald.cli.api.routes import ApiContext

Endpoint = Callable[[Request], Awaitable[Response]]


def dashboard_endpoints(context: ApiContext) -> list[tuple[str, str, Endpoint]]:
    """(path, method, endpoint) of the page and of its node figures."""
    page = files("petald.cli.api").joinpath("dashboard.html").read_bytes()  # read once: it never changes

    async def dashboard(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers={"cache-control": "no-cache"})

    async def node(request: Request) -> Response:
        return JSONResponse(node_figures(context))

    return [("/", "GET", dashboard), ("/petald/v1/node", "GET", node)]


def node_figures(context: ApiContext) -> dict[str, Any]:
    """What this node is doing now: its sessions, tokens, KV pages, failovers and traffic."""
    backend, registry = context.backend, context.metrics.registry

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    kv_total = sample("petald_kv_pages", state="total")
    return {
        "role": context.role, "model": backend.identity.model_id, "num_blocks": backend.identity.num_blocks,
        "details": context.details(), "uptime_s": round(time.time() - context.started_at, 1),
        "generations_active": backend.generations_running, "generations_total": backend.generations_total,
        "tokens_generated": backend.tokens_generated, "tokens_per_s": round(backend.token_rate.per_second(), 2),
        # A node without blocks has no KV pool: null, not zero.
        "kv_pages_total": kv_total, "kv_pages_reserved": sample("petald_kv_pages", state="reserved") if kv_total else None,
        "server_sessions_live": sample("petald_server_sessions_live"),
        "server_sessions_total": sample("petald_server_sessions_total"),
        "client_sessions_total": sample("petald_client_sessions_total"),
        "failovers": sample("petald_client_failovers_total"),
        "wire_bytes_in": sample("petald_wire_bytes_total", direction="in") or 0.0,
        "wire_bytes_out": sample("petald_wire_bytes_total", direction="out") or 0.0,
    }
