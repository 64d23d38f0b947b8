"""Decode, prefill, first token and start-up across a WAN of delay proxies, against the physical limit.

    python benchmarks/wan.py [--delays 10,25,50] [--tokens 32] [--prefill 512] [--threads 1]

Three servers (SmolLM2-135M, blocks 0:10, 10:20, 20:30, float32 compute) each listen on 127.0.0.1
behind a delay proxy of their own (``benchmarks/delay_proxy.py``, a process each) and announce the
proxy's address (``--announce``), so every byte sent to a server, by the client or pushed by the
previous server, crosses that server's proxy and waits its one-way delay d (each way).

The physical limit. With pushes a decode step crosses k + 1 = 4 one-way delays: client -> S1 ->
S2 -> S3 (pushed), and S3's answer -> client. So the least a token can take at delay d is what the
same setup takes at 0 ms (proxies in place, no delay) plus 4 d; the client-chained path (no pushes:
server -> client -> next server) needs 2 k = 6. The benchmark starts with d = 0, then each delay;
for each it starts the swarm afresh and measures, per wire (float32, float16, int8, auto: the
default) with pushes, and for the default also client-chained:

- decode ms/token (median of ``--tokens`` greedy steps after the first two, pipeline_overhead's loop),
- prefill: one step of ``--prefill`` tokens of ``petald/kernels/reference_text.txt`` (its 343 tokens
  repeated as needed), a session's first step,
- time to first token: a new session on an open client, a 8-token prompt, to its first token,
- start-up: a new client (``DistributedModel(initial_peers=[S1])``: it knows nothing else) from its
  construction to its first token, in seconds and in bytes on its TCP sockets (both ways).

A decode step faster than its limit would mean traffic went around a proxy: the table flags it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import trio  # noqa: E402

from benchmarks.pipeline_overhead import PROMPT, decode_remote  # noqa: E402  (the same decode loop)
from petald.cli.local_swarm import ServerProcess, even_spans  # noqa: E402
from petald.kernels.quant_choice import REFERENCE_TEXT  # noqa: E402
from petald.kernels.sources.open_source import open_source  # noqa: E402
from petald.p2pnode.client.distributed_model import DistributedModel  # noqa: E402

DELAY_PROXY = str(Path(__file__).resolve().parent / "delay_proxy.py")
SERVERS = 3
_PROXY_READY = re.compile(r"delay proxy ready at \S+:(\d+)")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ByteCounter:
    """Bytes this process's TCP sockets send and receive (trio's SocketStream carries all of
    libp2p's traffic, under Noise and yamux)."""

    def __init__(self) -> None:
        self.total = 0
        self._lock = threading.Lock()
        send_all, receive_some = trio.SocketStream.send_all, trio.SocketStream.receive_some
        counter = self

        async def counted_send_all(stream: trio.SocketStream, data: bytes) -> None:
            counter._add(len(data))
            await send_all(stream, data)

        async def counted_receive_some(stream: trio.SocketStream, max_bytes: int | None = None) -> bytes:
            data = await receive_some(stream, max_bytes)
            counter._add(len(data))
            return data

        trio.SocketStream.send_all = counted_send_all  # type: ignore[method-assign]
        trio.SocketStream.receive_some = counted_receive_some  # type: ignore[method-assign]

    def _add(self, n: int) -> None:
        with self._lock:
            self.total += n


@contextlib.contextmanager
def delayed_swarm(delay_ms: float, model: str | None, threads: int) -> Iterator[list[str]]:
    """Three servers, each behind a delay proxy it announces; yields their (proxied) addresses."""
    processes: list[subprocess.Popen] = []
    servers: list[ServerProcess] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        addresses: list[str] = []
        for blocks in even_spans(30, SERVERS):
            port = free_port()
            proxy = subprocess.Popen([sys.executable, DELAY_PROXY, "--listen", "127.0.0.1:0", "--to",
                                      f"127.0.0.1:{port}", "--delay-ms", str(delay_ms)],
                                     stdout=subprocess.PIPE, text=True, env=env)
            processes.append(proxy)
            assert proxy.stdout is not None
            ready = _PROXY_READY.search(proxy.stdout.readline())
            if not ready:
                raise RuntimeError("a delay proxy did not start")
            join = ["--initial-peers", addresses[0]] if addresses else ["--new-swarm"]
            cmd = [sys.executable, "-m", "petald.cli.main", "serve", "--blocks", blocks, "--no-api",
                   "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--announce", f"/ip4/127.0.0.1/tcp/{ready.group(1)}",
                   "--threads", str(threads), "--dtype", "float32", "--quant", "none", *join, *(["--model", model] if model else [])]
            process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            processes.append(process)
            server, started = ServerProcess(blocks, process), threading.Event()
            threading.Thread(target=server.pump, args=(started,), daemon=True).start()
            servers.append(server)
            started.wait(180)
            if not server.address:
                raise RuntimeError(f"server {blocks} did not start:\n" + "\n".join(server.output[-20:]))
            addresses.append(server.address)
        yield addresses
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


def prefill(model: DistributedModel, ids: torch.Tensor) -> float:
    """Seconds for a session's first step of ``ids`` (the session is open before the clock starts)."""
    with model.inference_session(1, ids.shape[1] + 1) as session:
        model.node.call(session.step, model.head.embed(ids[:, :1]))  # opens the spans' streams
        embedded = model.head.embed(ids[:, 1:])
        began = time.perf_counter()
        model.node.call(session.step, embedded)
        return time.perf_counter() - began


def first_token(model: DistributedModel) -> float:
    """Seconds from a new session on an open client to its first token for an 8-token prompt."""
    began = time.perf_counter()
    with model.inference_session(1, len(PROMPT) + 2) as session:
        hidden = model.node.call(session.step, model.head.embed(torch.tensor([PROMPT])))
        model.head.logits(hidden[:, -1]).argmax(-1)
        return time.perf_counter() - began


def measure(addresses: list[str], source, settings: dict, args: argparse.Namespace, counter: ByteCounter,
            text_ids: list[int]) -> dict:
    """One client with ``settings``: its start-up, then first token, decode and prefill."""
    before, began = counter.total, time.perf_counter()
    with DistributedModel(model=source, initial_peers=[addresses[0]], **settings) as model:
        first_token(model)
        startup = {"startup_s": time.perf_counter() - began, "startup_kb": (counter.total - before) / 1000}
        return {**startup, "ttft_ms": first_token(model) * 1000, "decode_ms": statistics.median(decode_remote(model, args.tokens)[0][2:]) * 1000,
                "prefill_s": prefill(model, torch.tensor([text_ids]))}


WIRES = ("float32", "float16", "int8", "auto")  # ClientOptions.wire; "auto" is the default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--delays", default="10,25,50", help="one-way delays in ms (0 always runs first)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every process")
    parser.add_argument("--wires", default=",".join(WIRES), help=f"of {', '.join(WIRES)}")
    parser.add_argument("--out", default="benchmarks/results/wan.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    delays = [0.0, *(float(d) for d in args.delays.split(",") if float(d) > 0)]
    wires = args.wires.split(",")
    counter = ByteCounter()
    source = open_source(args.model)
    text = source.load_tokenizer().encode(REFERENCE_TEXT.read_text())
    text_ids = (text * (args.prefill // len(text) + 1))[:args.prefill]
    hops = SERVERS + 1
    results: dict = {"model": source.identity.model_id, "tokens": args.tokens, "prefill": len(text_ids),
                     "servers": SERVERS, "machine": f"{platform.processor() or platform.machine()}, "
                     f"{os.cpu_count()} cores", "torch": torch.__version__, "runs": []}
    for delay in delays:
        say(f"{delay:g} ms one way: starting {SERVERS} servers behind delay proxies")
        with delayed_swarm(delay, args.model, args.threads) as addresses:
            for wire in wires:
                for push in (True, False) if wire == "auto" else (True,):  # the default, also client-chained
                    say(f"  {wire}, {'pushes' if push else 'client-chained'}")
                    row = measure(addresses, source, {"wire": wire, "push": push}, args, counter, text_ids)
                    results["runs"].append({"delay_ms": delay, "wire": wire, "push": push, **row})
    base = {(r["wire"], r["push"]): r["decode_ms"] for r in results["runs"] if r["delay_ms"] == 0}
    print(f"| one-way delay | wire | path | decode ms/token | limit | x limit | prefill {len(text_ids)} s "
          "| first token ms | start-up s | start-up KB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        crossings = hops if r["push"] else 2 * SERVERS
        r["limit_ms"] = base[(r["wire"], r["push"])] + crossings * r["delay_ms"]
        r["x_limit"] = r["decode_ms"] / r["limit_ms"]
        flag = " (below the limit: a proxy was bypassed?)" if r["x_limit"] < 0.97 else ""
        print(f"| {r['delay_ms']:g} ms | {r['wire']} | {'pushed' if r['push'] else 'client-chained'} "
              f"| {r['decode_ms']:.1f} | {r['limit_ms']:.1f} | {r['x_limit']:.2f}x{flag} | {r['prefill_s']:.2f} "
              f"| {r['ttft_ms']:.0f} | {r['startup_s']:.2f} | {r['startup_kb']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
