"""libp2p round trips of one petald-sized frame: the library's own path against petald's lean path.

    python benchmarks/transport_roundtrip.py [--trips 3000] [--size 2400] [--rounds 3]

A client host and an echo server host run in one trio loop in one process and
talk over TCP on 127.0.0.1 through Noise and yamux, with petald's framing
(FramedStream) on top. "library" hosts are built as py-libp2p builds them
(Noise + yamux, nothing patched); "petald" hosts are ``host.make_host``'s, with
the lean data path of ``p2pnode/transport/libp2p_internals``. Both run alternately in
the same invocation, several rounds, so the ratio compares like with like on a
shared machine; with no thread or process hand-offs in the loop, the figures are
the transport's own cost (both ends: two sends, two receives per round trip).
"petald private" hosts are petald's inside a swarm key (``--swarm-key``,
``private_network``): XSalsa20 under Noise, and the library's read path (the
lean one takes plain TCP connections only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multiaddr  # noqa: E402
import trio  # noqa: E402
from libp2p import new_host  # noqa: E402
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_pair  # noqa: E402
from libp2p.custom_types import TProtocol  # noqa: E402
from libp2p.network.config import ConnectionConfig  # noqa: E402
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID  # noqa: E402
from libp2p.security.noise.transport import Transport as NoiseTransport  # noqa: E402
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID  # noqa: E402
from libp2p.stream_muxer.yamux.yamux import Yamux  # noqa: E402

from petald.p2pnode.transport.framed_stream import FramedStream  # noqa: E402
from petald.p2pnode.transport.host import (  # noqa: E402
    DEFAULT_LISTEN,
    full_addresses,
    make_host,
    parse_peer_address,
    quiet_libp2p_logs,
)
from petald.p2pnode.transport.identity import load_or_create_identity  # noqa: E402
from petald.p2pnode.transport.swarm_key import SwarmKey  # noqa: E402

ECHO = TProtocol("/petald/bench-echo/1.0.0")


def library_host():
    key_pair = load_or_create_identity(None)
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_pair().private_key)
    return new_host(key_pair=key_pair, sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
                    muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
                    listen_addrs=[multiaddr.Multiaddr(DEFAULT_LISTEN)],
                    connection_config=ConnectionConfig(min_connections=0, low_watermark=0,
                                                       auto_connect_interval=3600.0))


def petald_host():
    return make_host(load_or_create_identity(None))


SWARM_KEY = SwarmKey(os.urandom(32))


def private_host():
    return make_host(load_or_create_identity(None), swarm_key=SWARM_KEY)


async def echo(stream) -> None:
    framed = FramedStream(stream)
    while (msg := await framed.receive()) is not None:
        await framed.send(msg)


async def measure(make, trips: int, size: int) -> tuple[float, float]:
    """Median wall ms and CPU ms per round trip."""
    listen = [multiaddr.Multiaddr(DEFAULT_LISTEN)]
    server, client = make(), make()
    async with server.run(listen_addrs=listen), client.run(listen_addrs=listen):
        server.set_stream_handler(ECHO, echo)
        info = parse_peer_address(full_addresses(server)[0])
        await client.connect(info)
        framed = FramedStream(await client.new_stream(info.peer_id, [ECHO]))
        msg = {"type": "step", "data": os.urandom(size)}
        for _ in range(200):
            await framed.send(msg)
            await framed.receive()
        times = []
        cpu0 = time.process_time()
        for _ in range(trips):
            t0 = time.perf_counter()
            await framed.send(msg)
            await framed.receive()
            times.append(time.perf_counter() - t0)
        cpu = (time.process_time() - cpu0) / trips
        await framed.close()
    return statistics.median(times) * 1000, cpu * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trips", type=int, default=3000)
    parser.add_argument("--size", type=int, default=2400, help="payload bytes (2304 = one float32 SmolLM2 hidden)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    quiet_libp2p_logs()
    hosts = {"library": library_host, "petald": petald_host, "petald private": private_host}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in hosts}
    for _ in range(args.rounds):
        for name, make in hosts.items():
            results[name].append(trio.run(measure, make, args.trips, args.size))
    print(f"| hosts | round trip ms (median of {args.rounds} rounds) | CPU ms per round trip | rounds (ms) |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        wall = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {', '.join(f'{r[0]:.3f}' for r in rows)} |")
    lib = statistics.median(r[0] for r in results["library"])
    lean = statistics.median(r[0] for r in results["petald"])
    private = statistics.median(r[0] for r in results["petald private"])
    print(f"\npetald / library round trip: {lean / lib:.2f}x; petald private / petald: {private / lean:.2f}x")


if __name__ == "__main__":
    main()
