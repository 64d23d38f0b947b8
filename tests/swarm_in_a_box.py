"""Real ``petald serve`` processes on hosts of an internet in a box (tests/internet_in_a_box.py).

    server = start_server(box, "public1", "0:3", ["--new-swarm", "--model", path])
    start_server(box, "public2", "3:6", ["--initial-peers", server.address, "--model", path])

Each server listens on its host's own address (port 0) unless ``listen`` says otherwise, and is
stopped by the box on exit (the box stops every process it started).
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Sequence

from petald.cli.local_swarm import ServerProcess
from tests.internet_in_a_box import InternetInABox
from tests.petald_cli import PETALD


def start_server(box: InternetInABox, host: str, blocks: str, args: Sequence[str], listen: str | None = None,
                 timeout: float = 180.0) -> ServerProcess:
    """``petald serve --blocks BLOCKS ARGS`` on ``host``, once it prints the address it serves at."""
    listen = listen or f"/ip4/{box.address(host)}/tcp/0"
    cmd = [*PETALD, "serve", "--blocks", blocks, "--listen", listen, "--no-api", "--threads", "1", *args]
    process = box.popen(host, cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    server, ready = ServerProcess(blocks, process), threading.Event()
    threading.Thread(target=server.pump, args=(ready,), daemon=True).start()
    ready.wait(timeout)
    if not server.address:
        tail = "\n".join(server.output[-20:])
        raise RuntimeError(f"server for blocks {blocks} on {host} did not start:\n{tail}")
    return server
