"""``petald generate`` and ``petald chat`` talking to a running daemon over its Unix socket.

Plain httpx (synchronous, no event loop) with the OpenAI wire format; the stream is read as
server-sent events.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from petald.cli.api.unix_socket import socket_answers

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 600.0  # one token may wait for a whole route to be found


class DaemonError(Exception):
    """The daemon answered with an error; the message is its own sentence."""


class DaemonClient:
    def __init__(self, socket_path: Path):
        self.socket_path = socket_path
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://petald",
                                  timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
        self.last_usage: dict[str, int] | None = None  # the last stream's usage, as the daemon counted it

    @classmethod
    def running_at(cls, socket_path: Path) -> DaemonClient | None:
        """A client if a petald daemon answers on ``socket_path``, else None."""
        if not socket_answers(socket_path):
            return None
        client = cls(socket_path)
        try:
            health = client._http.get("/health", timeout=CONNECT_TIMEOUT_S)
            if health.status_code == 200 and health.json().get("status") == "ok":
                return client
        except (httpx.HTTPError, ValueError):
            pass
        client.close()
        return None

    def model_id(self) -> str:
        return self._check(self._http.get("/v1/models"))["data"][0]["id"]

    def swarm(self) -> list[dict[str, Any]]:
        """The swarm map as the daemon sees it (JSON form)."""
        return self._check(self._http.get("/v1/swarm"))["models"]

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[str]:
        """POST ``body`` with ``stream: true``; yields text pieces as they arrive."""
        try:
            yield from self._stream(path, body)
        except httpx.TransportError as exc:
            raise DaemonError(f"lost the connection to the daemon at {self.socket_path}: "
                              f"{exc or type(exc).__name__}") from None

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[str]:
        self.last_usage = None
        with self._http.stream("POST", path, json={**body, "stream": True,
                                                    "stream_options": {"include_usage": True}}) as response:
            if response.status_code != 200:
                response.read()
                self._check(response)
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise DaemonError(event["error"].get("message", "the daemon failed"))
                if event.get("usage"):
                    self.last_usage = event["usage"]  # the last event before [DONE]: the tokens counted
                for choice in event.get("choices", []):
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        yield text

    @staticmethod
    def _check(response: httpx.Response) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200:
            message = (body or {}).get("error", {}).get("message") if isinstance(body, dict) else None
            raise DaemonError(message or f"the daemon answered HTTP {response.status_code}")
        return body

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
