"""The local API's key (issue 22, item 5): --http beyond loopback needs --api-key, and then every
request over TCP must carry it; the Unix socket needs none and stays owner-only. The real listener
(``serve_api``: Hypercorn on a Unix socket and on 127.0.0.1) in front of a one-route app."""

from __future__ import annotations

import stat

import httpx
import pytest
import trio
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from petald.cli.api.bearer_auth import MIN_API_KEY_CHARS, check_api_key
from petald.cli.api.server import ApiListen, serve_api
from tests.petald_cli import assert_refused, invoke

KEY = "k" * 8 + "3f9a1c0e2b7d4d55"


async def _hello(request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


def _answers(socket_path, api_key: str | None, requests: list[tuple[str, dict[str, str]]]) -> list[int]:
    """Serve the app with ``serve_api``; the status of each (over, headers) request, ``over`` being
    "tcp" or "socket"."""
    app = Starlette(routes=[Route("/health", _hello)])
    statuses: list[int] = []

    def ask(url: str) -> None:
        for over, headers in requests:
            transport = httpx.HTTPTransport(uds=str(socket_path)) if over == "socket" else None
            with httpx.Client(transport=transport, timeout=30) as client:
                base = "http://petald" if over == "socket" else url
                answer = client.get(f"{base}/health", headers=headers)
                statuses.append(answer.status_code)
                if answer.status_code == 401:
                    assert answer.json()["error"]["code"] == "invalid_api_key"
                    assert answer.headers["www-authenticate"].startswith("Bearer")
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600  # owner-only: the socket's own protection

    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                urls = await nursery.start(serve_api, app, ApiListen(socket_path, "127.0.0.1:0", api_key=api_key))
                await trio.to_thread.run_sync(ask, next(u for u in urls if u.startswith("http://127.0.0.1")))
                nursery.cancel_scope.cancel()

    trio.run(main)
    return statuses


def test_with_a_key_every_tcp_request_needs_it_and_the_socket_does_not(tmp_path):
    bearer = {"Authorization": f"Bearer {KEY}"}
    requests = [("tcp", {}), ("tcp", {"Authorization": f"Bearer {KEY[:-1]}x"}), ("tcp", {"Authorization": KEY}),
                ("tcp", {"Authorization": f"Basic {KEY}"}), ("tcp", bearer),
                ("tcp", {"authorization": f"bearer  {KEY}"}), ("socket", {})]
    assert _answers(tmp_path / "api.sock", KEY, requests) == [401, 401, 401, 401, 200, 200, 200]


def test_on_loopback_without_a_key_nothing_is_asked(tmp_path):
    assert _answers(tmp_path / "api.sock", None, [("tcp", {}), ("socket", {})]) == [200, 200]


@pytest.mark.parametrize("http", ["0.0.0.0:8080", "[::]:8080", "192.0.2.7:8080", "example.com:80"])
def test_beyond_loopback_a_key_is_required(http):
    with pytest.raises(ValueError, match=f"--http {http.replace('[', '.').replace(']', '.')} reaches beyond"):
        check_api_key(http, http.rpartition(":")[0].strip("[]"), None)
    check_api_key(http, http.rpartition(":")[0].strip("[]"), KEY)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "localhost", "::1"])
def test_loopback_needs_no_key(host):
    check_api_key(f"{host}:8080", host, None)


def test_a_short_key_is_refused():
    with pytest.raises(ValueError, match=f"at least {MIN_API_KEY_CHARS} characters"):
        check_api_key("127.0.0.1:8080", "127.0.0.1", "secret")


@pytest.mark.parametrize("command", ["daemon", "serve"])
def test_the_commands_refuse_an_open_api_without_a_key_at_once(command, tmp_path):
    args = ["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
            "--socket", str(tmp_path / "api.sock"), "--http", "0.0.0.0:0"]
    result = invoke(command, *args)
    assert_refused(result, 1, "petald: error: --http 0.0.0.0:0 reaches beyond this machine: give --api-key KEY "
                              "(or PETALD_API_KEY), which every request must then send as 'Authorization: Bearer "
                              "KEY', or listen on 127.0.0.1")
    # PETALD_API_KEY is read like the flag (here refused for its length, before anything starts).
    short = invoke(command, *args, env={"PETALD_API_KEY": "short"})
    assert_refused(short, 1, f"petald: error: --api-key must be at least {MIN_API_KEY_CHARS} characters; make one "
                             "with `openssl rand -hex 16`")


def test_config_show_never_prints_the_key():
    result = invoke("config", "show", "daemon", env={"PETALD_API_KEY": KEY})
    assert result.exit_code == 0 and KEY not in result.output
    assert 'api_key = "(set; not shown)"  # env PETALD_API_KEY' in result.output
