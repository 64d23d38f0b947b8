"""Real processes on hosts of an internet in a box (tests/internet_in_a_box.py): ``petald serve``,
and the delay proxy (benchmarks/delay_proxy.py) that puts a host farther away.

    server = start_server(box, "public1", "0:3", ["--new-swarm", "--model", path])
    start_server(box, "public2", "3:6", ["--initial-peers", server.address, "--model", path])
    far = start_server_behind_delay(box, "public2", "3:6", [...], delay_ms=25)

Each server listens on its host's own address (port 0) unless ``listen`` says otherwise. A server
25 ms away (``start_server_behind_delay``) listens on its host's loopback, so that nobody reaches
it but through the delay proxy on the host's address, and announces the proxy's address. The box
stops every process it started on exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from petald.cli.local_swarm import ServerProcess
from tests.internet_in_a_box import InternetInABox
from tests.petald_cli import PETALD

DELAY_PROXY = str(Path(__file__).resolve().parents[1] / "benchmarks" / "delay_proxy.py")


def start_server(box: InternetInABox, host: str, blocks: str, args: Sequence[str], listen: str | None = None,
                 timeout: float = 180.0) -> ServerProcess:
    """``petald serve --blocks BLOCKS ARGS`` on ``host``, once it prints the address it serves at."""
    listen = listen or f"/ip4/{box.address(host)}/tcp/0"
    cmd = [*PETALD, "serve", "--blocks", blocks, "--listen", listen, "--no-api", "--threads", "1", "--quant", "none", *args]
    process = box.popen(host, cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    server, ready = ServerProcess(blocks, process), threading.Event()
    threading.Thread(target=server.pump, args=(ready,), daemon=True).start()
    ready.wait(timeout)
    if not server.address:
        tail = "\n".join(server.output[-20:])
        raise RuntimeError(f"server for blocks {blocks} on {host} did not start:\n{tail}")
    return server


def start_delay_proxy(box: InternetInABox, host: str, to: tuple[str, int], delay_ms: float,
                      mbps: float | None = None, port: int = 0) -> int:
    """benchmarks/delay_proxy.py on ``host``, listening on the host's address (``port``, 0: any
    free one) and forwarding to ``to`` with ``delay_ms`` each way; returns the port, once it listens."""
    cmd = [sys.executable, DELAY_PROXY, "--listen", f"{box.address(host)}:{port}", "--to", f"{to[0]}:{to[1]}",
           "--delay-ms", str(delay_ms)] + (["--mbps", str(mbps)] if mbps else [])
    process = box.popen(host, cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    ready = process.stdout.readline()
    if not ready.startswith("delay proxy ready at "):
        raise RuntimeError(f"the delay proxy on {host} did not start: {ready}{process.stdout.read()}")
    return int(ready.split()[4].rsplit(":", 1)[1])


def start_server_behind_delay(box: InternetInABox, host: str, blocks: str, args: Sequence[str], delay_ms: float,
                              mbps: float | None = None, port: int = 31337) -> ServerProcess:
    """A server that others reach ``delay_ms`` away (each way): ``petald serve`` on ``host``'s loopback
    at ``port``, behind a delay proxy on the host's address at the same port (each host has ports
    of its own), announcing the proxy's address."""
    start_delay_proxy(box, host, ("127.0.0.1", port), delay_ms, mbps, port=port)
    announce = f"/ip4/{box.address(host)}/tcp/{port}"
    return start_server(box, host, blocks, [*args, "--announce", announce], listen=f"/ip4/127.0.0.1/tcp/{port}")
