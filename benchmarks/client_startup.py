"""What a client costs from its start to its first token: seconds by phase, bytes, connections, streams.

    python benchmarks/client_startup.py [--runs 5]
    python benchmarks/client_startup.py --tree before=/path/to/main --tree after=.   # side by side
    python benchmarks/client_startup.py --delay-ms 50     # every server 50 ms away, each way

For each code tree (default: the petald this script imports) a swarm of 3 ``petald serve``
processes on 127.0.0.1 serves SmolLM2's 30 blocks (0:10, 10:20, 20:30), started with that
tree on PYTHONPATH (with ``--delay-ms``, each behind a delay proxy of that one-way delay,
announcing the proxy's address, so that every connection to a server crosses it: trees without
``serve --announce`` cannot). Then, run after run, alternating between the trees so that load on the
machine falls on both alike, a new process of each tree:

- opens a client as the Python API does (``open_source`` then ``DistributedModel(model=...,
  initial_peers=[one server's address])``: it knows nothing else of the swarm) and generates
  one token, timing each phase; every byte its TCP sockets send and receive is counted
  (trio's ``SocketStream``, under Noise and yamux), and every stream it opens or accepts, by
  protocol (multistream-select's answer);
- runs ``petald generate --initial-peers ADDR`` and times its first byte of output.

Bytes and streams are the client's own, from its start to its first token. Only the public
API is used, so the same probe measures any tree.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

SPANS = ["0:10", "10:20", "20:30"]
PROMPT = "The capital of France is"
DHT_PROTOCOL = "/petald/kad/1.0.0"
THIS_SCRIPT = Path(__file__).resolve()  # the probe each tree's process runs (from that tree's directory)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the probe: one client, in a process of its own ----------------------------------------------

class WireCounters:
    """Counts what this process's libp2p does on the wire, by patching the classes it goes through."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def install(self) -> None:
        import trio
        from libp2p.protocol_muxer import multiselect, multiselect_client

        counts = self.counts
        send_all, receive_some, init = trio.SocketStream.send_all, trio.SocketStream.receive_some, \
            trio.SocketStream.__init__
        select_one_of, negotiate = multiselect_client.MultiselectClient.select_one_of, \
            multiselect.Multiselect.negotiate

        async def counted_send_all(stream, data):
            counts["bytes sent"] += len(data)
            return await send_all(stream, data)

        async def counted_receive_some(stream, max_bytes=None):
            data = await receive_some(stream, max_bytes)
            counts["bytes received"] += len(data)
            return data

        def counted_init(stream, socket):
            counts["TCP connections"] += 1
            init(stream, socket)

        def counting(select):
            async def counted_select(client, protocols, communicator, *args, **kwargs):
                if getattr(communicator, "_counted", False):  # a subclass's call of the library's
                    return await select(client, protocols, communicator, *args, **kwargs)
                communicator._counted = True
                protocol = await select(client, protocols, communicator, *args, **kwargs)
                counts[f"streams out {protocol}"] += 1
                return protocol
            return counted_select

        async def counted_negotiate(muxer, *args, **kwargs):
            answer = await negotiate(muxer, *args, **kwargs)
            counts[f"streams in {answer[0]}"] += 1
            return answer

        self._selects_counted = {multiselect_client.MultiselectClient}
        trio.SocketStream.send_all = counted_send_all
        trio.SocketStream.receive_some = counted_receive_some
        trio.SocketStream.__init__ = counted_init
        multiselect_client.MultiselectClient.select_one_of = counting(select_one_of)
        self._count_selects = counting
        multiselect.Multiselect.negotiate = counted_negotiate

    def count_subclasses(self) -> None:
        """Count the selections of the multiselect clients imported since ``install`` too."""
        from libp2p.protocol_muxer.multiselect_client import MultiselectClient

        pending = list(MultiselectClient.__subclasses__())
        while pending:
            cls = pending.pop()
            pending.extend(cls.__subclasses__())
            if cls not in self._selects_counted and "select_one_of" in vars(cls):
                cls.select_one_of = self._count_selects(vars(cls)["select_one_of"])
                self._selects_counted.add(cls)


def probe(address: str) -> dict[str, float]:
    """One client's start, phase by phase; what it prints is this dict as JSON."""
    began = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    counters = WireCounters()
    counters.install()
    import torch  # noqa: F401  (timed with the imports: every client pays it)

    from petald.kernels.sources.open_source import open_source
    from petald.p2pnode.client.distributed_model import DistributedModel
    from petald.p2pnode.transport.host import quiet_libp2p_logs

    counters.count_subclasses()  # a tree's own multiselect client (petald's pipelined one)

    quiet_libp2p_logs()
    out: dict[str, float] = {}
    t0 = time.monotonic()
    out["import torch, transformers, libp2p, petald (s)"] = t0 - began
    source = open_source(None)
    t1 = time.monotonic()
    out["open the model: GGUF index, config (s)"] = t1 - t0
    model = DistributedModel(model=source, initial_peers=[address])
    t2 = time.monotonic()
    out["DistributedModel(): join, find servers, RTTs, head (s)"] = t2 - t1
    joined = dict(counters.counts)
    try:
        ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
        t3 = time.monotonic()
        out["tokenizer (cached per file) (s)"] = t3 - t2
        model.generate(ids, max_new_tokens=1)
        t4 = time.monotonic()
        out["route, open the session, first token (s)"] = t4 - t3
    finally:
        model.close()
    out["start to first token (s)"] = t4 - began
    out["DistributedModel(): bytes sent + received"] = joined.get("bytes sent", 0) + joined.get("bytes received", 0)
    for name, value in sorted(counters.counts.items()):
        out[f"to first token: {name}"] = value
    out["to first token: DHT streams"] = counters.counts.get(f"streams out {DHT_PROTOCOL}", 0)
    return out


# --- the driver ------------------------------------------------------------------------------------

def tree_env(tree: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")


@contextlib.contextmanager
def swarm_of(tree: Path, delay_ms: float) -> Iterator[str]:
    """A 3-server swarm running ``tree``'s code, each server ``delay_ms`` away (0: on loopback);
    yields the last server's address."""
    from benchmarks.delay_proxy import DelayProxy
    from petald.cli.local_swarm import LocalSwarm

    proxies = contextlib.ExitStack()
    server_args: list[list[str]] = []
    for _ in SPANS if delay_ms else ():
        with socket.socket() as probe:  # a free port for the server, behind the proxy
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proxy = proxies.enter_context(DelayProxy(("127.0.0.1", port), delay_ms / 1000))
        server_args.append(["--listen", f"/ip4/127.0.0.1/tcp/{port}", "--announce", f"/ip4/127.0.0.1/tcp/{proxy.port}"])

    # LocalSwarm's servers inherit this process's environment and directory (``python -m`` puts the
    # directory first on the path, ahead of PYTHONPATH).
    saved, cwd = os.environ.get("PYTHONPATH"), os.getcwd()
    os.environ["PYTHONPATH"] = str(tree)
    os.chdir(tree)
    try:
        swarm = LocalSwarm(SPANS, extra_args=["--threads", "1"], server_args=server_args)
        swarm.__enter__()  # stops what it started if a server fails to start
    except BaseException:
        proxies.close()
        raise
    finally:
        os.chdir(cwd)
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    try:
        yield swarm.addresses[-1]
    finally:
        swarm.stop()
        proxies.close()


def run_probe(tree: Path, address: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, str(THIS_SCRIPT), "--probe", address], env=tree_env(tree), cwd=tree,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the probe failed with {tree} on the path:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def generate_first_byte(tree: Path, address: str) -> float:
    """Seconds from ``petald generate --initial-peers`` start to its first byte of output."""
    began = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "petald.cli.main", "generate", PROMPT, "--initial-peers",
                             address, "--max-new-tokens", "4"], env=tree_env(tree),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tree)
    assert proc.stdout is not None
    proc.stdout.read(1)
    first = time.monotonic() - began
    _, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"petald generate failed with {tree} on the path:\n{err.decode()[-3000:]}")
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                        help="a checkout whose petald to measure (repeatable; default: this one)")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="one-way delay in front of every server (each direction), in ms")
    parser.add_argument("--probe", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe)))
        return
    trees = {}
    for item in args.tree or [f"this={THIS_SCRIPT.parents[1]}"]:
        name, _, path = item.partition("=")
        if not path or not (Path(path) / "petald").is_dir():
            parser.error(f"--tree {item}: give NAME=PATH to a checkout that holds petald/")
        trees[name] = Path(path).resolve()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with contextlib.ExitStack() as stack:
        addresses = {}
        for name, tree in trees.items():
            addresses[name] = stack.enter_context(swarm_of(tree, args.delay_ms))
            say(f"{name}: swarm of {len(SPANS)} servers up ({tree})")
        for run in range(args.runs):
            for name, tree in trees.items():
                row = run_probe(tree, addresses[name])
                row["`petald generate --initial-peers`: start to first output (s)"] = \
                    generate_first_byte(tree, addresses[name])
                results[name].append(row)
                say(f"run {run + 1} {name}: {row['start to first token (s)']:.2f} s to the first token, "
                    f"{row['to first token: bytes sent'] + row['to first token: bytes received']:.0f} bytes")
    print_table(results, args.delay_ms)


def print_table(results: dict[str, list[dict[str, float]]], delay_ms: float) -> None:
    names = list(results)
    measures = list(dict.fromkeys(key for rows in results.values() for row in rows for key in row))
    runs = len(next(iter(results.values())))
    where = f"each behind a {delay_ms:g} ms one-way delay proxy" if delay_ms else "on loopback"
    print(f"\nmedians of {runs} runs; 3 servers (SmolLM2, 30 blocks in 3 spans) on 127.0.0.1, {where}\n")
    print("| measure | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for measure in measures:
        cells = []
        for name in names:
            values = [row.get(measure, 0) for row in results[name]]
            median = statistics.median(values)
            cells.append(f"{median:.2f}" if measure.endswith("(s)") else f"{median:.0f}")
        print(f"| {measure} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
