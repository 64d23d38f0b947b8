"""Start real ``petald serve`` processes on 127.0.0.1 and wait until each prints its address.

The first server starts a new swarm; the others join it through the first one's address.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from petald.vocabulary import DEFAULT_LISTEN

_ADDRESS = re.compile(r"serving blocks (\d+):(\d+) .* at (/ip4/\S+/p2p/\S+)")


def even_spans(num_blocks: int, servers: int) -> list[str]:
    """``servers`` contiguous spans covering [0, num_blocks) as evenly as possible, as A:B strings."""
    cuts = [round(i * num_blocks / servers) for i in range(servers + 1)]
    return [f"{a}:{b}" for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


@dataclass
class ServerProcess:
    blocks: str
    process: subprocess.Popen
    address: str = ""
    span: tuple[int, int] | None = None  # what it serves now (it may move with --blocks auto)
    output: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None  # when it first printed its address (routable)
    serves_api: bool = False  # started with --socket: ready once its local API listens too
    api_ready: bool = False

    def pump(self, ready: threading.Event) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line.rstrip("\n"))
            match = _ADDRESS.search(line)
            if match:
                self.span = (int(match.group(1)), int(match.group(2)))
                if not self.address:
                    self.address = match.group(3)
                    self.ready_at = time.monotonic()
            if "local API on unix:" in line:
                self.api_ready = True
            if self.address and (self.api_ready or not self.serves_api):
                ready.set()
        ready.set()  # the process ended: wake the waiter either way

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class LocalSwarm:
    """Server processes for ``spans``; use as a context manager so they always stop."""

    def __init__(self, spans: Sequence[str], model: str | None = None, extra_args: Sequence[str] = (),
                 start_timeout: float = 180.0, log=None, server_args: Sequence[Sequence[str]] = (),
                 quant: str | None = "none"):
        """``extra_args`` go to every server; ``server_args[i]``, if given, to the i-th one only
        (its own ``--listen`` and ``--announce``, say). ``quant``: the servers' ``--quant`` where their
        arguments name none: float32 weights unless asked, so that tests and benchmarks compare with
        the exact model; None leaves each server's own default (auto)."""
        quant_args = [] if quant is None or "--quant" in extra_args else ["--quant", quant]
        self.spans, self.model, self.extra_args = list(spans), model, [*extra_args, *quant_args]
        self.server_args = [list(a) for a in server_args] + [[] for _ in range(len(self.spans) - len(server_args))]
        self.start_timeout = start_timeout
        self.servers: list[ServerProcess] = []
        self.log = log or (lambda text: None)

    def __enter__(self) -> LocalSwarm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        first, *rest = zip(self.spans, self.server_args, strict=True)
        self._launch([first], ["--new-swarm"])
        if rest:
            self._launch(rest, ["--initial-peers", self.servers[0].address])

    def add(self, blocks: str = "auto", extra_args: Sequence[str] = ()) -> ServerProcess:
        """One more server, joining the swarm through the first one (the one this call started,
        also when several threads add servers at once)."""
        return self._launch([(blocks, list(extra_args))], ["--initial-peers", self.servers[0].address])[0]

    def _launch(self, servers: Sequence[tuple[str, list[str]]], swarm_args: list[str]) -> list[ServerProcess]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        started: list[tuple[ServerProcess, threading.Event]] = []
        for blocks, own_args in servers:
            cmd = [sys.executable, "-m", "petald.cli.main", "serve", "--blocks", blocks,
                   "--listen", DEFAULT_LISTEN, *swarm_args, *self.extra_args, *own_args]
            if "--socket" not in cmd:
                cmd.append("--no-api")  # servers of one machine would all claim the default socket
            if self.model:
                cmd += ["--model", self.model]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            server, ready = ServerProcess(blocks, proc, serves_api="--socket" in cmd), threading.Event()
            threading.Thread(target=server.pump, args=(ready,), daemon=True).start()
            self.servers.append(server)
            started.append((server, ready))
        deadline = time.monotonic() + self.start_timeout
        for server, ready in started:
            ready.wait(max(0.0, deadline - time.monotonic()))
            if not server.address:
                tail = "\n".join(server.output[-20:])
                raise RuntimeError(f"server for blocks {server.blocks} did not start:\n{tail}")
            self.log(f"server {server.blocks} ready at {server.address}")
        return [server for server, _ in started]

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]

    def stop(self) -> None:
        for server in self.servers:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
        for server in self.servers:
            server.stop()
