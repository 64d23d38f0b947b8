"""One log line per request to the local API (``-v``): method, path, status and time, written
when the response has ended (a stream's whole length, not its first byte)."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("petald.api.requests")

Scope = dict[str, Any]


class RequestLog:
    """ASGI middleware around the app: it only watches what passes."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 0  # none sent: the client left, or the app failed before answering

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            log.info("%s %s %s %.3f s", scope["method"], scope["path"], status or "-", time.perf_counter() - began)
