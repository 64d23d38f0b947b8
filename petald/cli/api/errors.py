"""Errors of the local API in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a request can meet becomes one of these with an HTTP status a client can act
on; nothing reaches the caller as a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def as_api_error(exc: BaseException) -> ApiError:
    """The API error for anything the backend raised."""
    from petald.kernels.sources.model_source import ModelSourceError
    from petald.p2pnode.client.distributed_model import ModelMismatchError
    from petald.p2pnode.routing.route import NoRouteError, SessionTooLarge, SwarmFull
    from petald.p2pnode.transport.peer_streams import ServerUnavailable
    from petald.protocol.errors import ProtocolError, RemoteError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, SessionTooLarge):  # no server of the swarm can ever take it: the request must change
        return ApiError(400, str(exc), param="max_tokens", code="request_too_large")
    if isinstance(exc, SwarmFull):  # servers are there, their KV caches taken: retry later
        return ApiError(503, str(exc), type="service_unavailable", code="cache_full")
    if isinstance(exc, NoRouteError):
        return ApiError(503, f"the swarm cannot serve this request now: {exc}", type="service_unavailable",
                        code="swarm_incomplete")
    if isinstance(exc, ServerUnavailable | ModelMismatchError):
        return ApiError(503, f"no usable server: {exc}", type="service_unavailable", code="server_unavailable")
    if isinstance(exc, RemoteError):
        if exc.code == "cache_full":
            return ApiError(503, str(exc), type="service_unavailable", code=exc.code)
        if exc.code in ("bad_message", "too_large"):  # what the request asked for is beyond a server's limits
            return ApiError(400, str(exc), code=exc.code)
        return ApiError(502, str(exc), type="server_error", code=exc.code)
    if isinstance(exc, ProtocolError):
        return ApiError(502, f"a server sent something petald cannot read: {exc}", type="server_error",
                        code="protocol_error")
    if isinstance(exc, ModelSourceError):
        return ApiError(500, str(exc), type="server_error", code="model_source")
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    if isinstance(exc, TimeoutError):
        return ApiError(504, f"the swarm did not answer in time: {exc}", type="server_error", code="timeout")
    log.error("unexpected error in the local API", exc_info=exc)
    return ApiError(500, f"unexpected {type(exc).__name__}: {exc} (the daemon's log has the details)",
                    type="server_error", code="internal_error")
