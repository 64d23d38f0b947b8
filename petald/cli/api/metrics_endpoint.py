"""``GET /metrics``: the node's metrics in Prometheus' text format, written by prometheus_client
from the node's own registry (``p2pnode/transport/node_metrics.py``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from petald.p2pnode.transport.node_metrics import NodeMetrics


def metrics_endpoint(metrics: NodeMetrics) -> Callable[[Request], Awaitable[Response]]:
    async def scrape(request: Request) -> Response:
        # Gauges read live state (sessions, KV pages, DHT records) as they are written: microseconds.
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return scrape
