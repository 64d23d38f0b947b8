"""The API key of the local API's TCP listener (``--http``): every request there must carry
``Authorization: Bearer KEY``, or it is answered 401 before the app sees it.

Requests over the Unix socket need no key: the socket's file permissions (0600, or 0660 for
``--socket-group``) already say who may connect. Hypercorn tells them apart: a request over a
Unix socket has no ``server`` address in its ASGI scope.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from typing import Any

log = logging.getLogger(__name__)

MIN_API_KEY_CHARS = 16  # e.g. `openssl rand -hex 16` gives 32
_UNAUTHORIZED = json.dumps({"error": {
    "message": "this API needs its key: send the header 'Authorization: Bearer KEY' with the key "
               "petald was started with (--api-key or PETALD_API_KEY)",
    "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}).encode()


def is_loopback_host(host: str) -> bool:
    """Whether ``--http HOST:PORT`` listens on this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere


def check_api_key(http: str | None, host: str | None, api_key: str | None) -> None:
    """Refuse now, with a sentence, an API that would answer other machines without a key, and a
    key too short to be one. ``host``: that of ``http`` (HOST:PORT)."""
    if api_key is not None and len(api_key) < MIN_API_KEY_CHARS:
        raise ValueError(f"--api-key must be at least {MIN_API_KEY_CHARS} characters; make one with "
                         "`openssl rand -hex 16`")
    if http is not None and host is not None and not is_loopback_host(host) and api_key is None:
        raise ValueError(f"--http {http} reaches beyond this machine: give --api-key KEY (or PETALD_API_KEY), "
                         "which every request must then send as 'Authorization: Bearer KEY', or listen on "
                         "127.0.0.1")


class BearerAuth:
    """ASGI middleware: requests over TCP without the key get 401; the socket's pass."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self._expected = api_key.encode()

    def _authorized(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                # Constant time: how long a wrong key takes to refuse says nothing about the right one.
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._expected)
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" or scope.get("server") is None or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        log.info("refused %s %s from %s: no valid API key", scope.get("method", scope["type"]),
                 scope.get("path"), (scope.get("client") or ("?",))[0])
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(_UNAUTHORIZED)).encode()),
            (b"www-authenticate", b'Bearer realm="petald"')]})
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})
