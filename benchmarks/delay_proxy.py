"""A TCP proxy that adds a fixed one-way delay, and optionally a bandwidth cap, in each direction.

    python benchmarks/delay_proxy.py --listen 127.0.0.1:0 --to 127.0.0.1:31337 --delay-ms 25 [--mbps 100]

prints ``delay proxy ready at HOST:PORT -> ...`` once it listens (port 0 picks a free port), then
forwards every connection it accepts to ``--to``. The kernel here has no netem, so this is how a
benchmark puts a server 25 ms away: the server listens behind the proxy and announces the proxy's
address (``--announce``).

How it delays: each chunk read from one leg is stamped on arrival and written to the other leg at
arrival + delay, in order (so a stream keeps its bytes and their order; a slow writer only delays
what follows it). With a cap, a chunk also waits for the link: it is sent once the chunks before it
have been (at ``mbps``), then arrives ``delay`` later, as on a real link of that rate and length.
TCP_NODELAY is on for both legs, so the proxy adds no batching of its own. A close travels like data:
when one side closes its sending half, the other leg's sending half is closed once the data before
it is delivered; when one side resets, the other leg is reset after that side's last data. A write
to a side that has gone away closes both legs at once. The TCP handshake is not delayed (the proxy
accepts at once, then dials ``--to``): a new connection is one round trip quicker to open than on a
real link of that length; data on it, the Noise handshake included, gets the full delays.

Importable: ``serve_delay_proxy`` (trio) and ``DelayProxy`` (a context manager that runs one on a
thread of its own, for synchronous callers such as tests).
"""

from __future__ import annotations

import argparse
import math
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

CHUNK = 64 * 1024
CAPPED_CHUNK = 16 * 1024  # smaller reads under a cap, so one read is not one long burst
QUEUED_CHUNKS = 1024  # per direction: what has arrived but is not delivered yet (bounded memory)


@dataclass(frozen=True)
class Link:
    """One direction: its one-way delay (seconds) and optional cap (Mbit/s)."""

    delay: float
    mbps: float | None = None

    def __post_init__(self) -> None:
        if not (self.delay >= 0 and math.isfinite(self.delay)):
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {self.delay!r}")
        if self.mbps is not None and not (self.mbps > 0 and math.isfinite(self.mbps)):
            raise ValueError(f"bandwidth cap must be a positive number of Mbit/s, not {self.mbps!r}")


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:31337")
    return host, int(port)


def _no_delay(stream: trio.SocketStream) -> None:
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# trio's timers wake up to ~1 ms late (epoll's timeout is whole milliseconds, rounded up): 1 ms
# more per hop and direction than asked. So the proxy wakes a little early and sleeps the rest on
# the OS clock (~0.1 ms precise), blocking its loop for at most EARLY: every chunk due is late by
# less than that, not by a systematic millisecond.
EARLY = 0.0015


async def _wait_until(due: float) -> None:
    await trio.sleep_until(due - EARLY)
    rest = due - trio.current_time()
    if rest > 0:
        time.sleep(rest)


class _Vanished(Exception):
    """The source of one direction reset its connection: the proxy resets the other leg."""


async def _carry(source: trio.SocketStream, sink: trio.SocketStream, link: Link) -> None:
    """Everything ``source`` sends, to ``sink``, ``link.delay`` later (paced at ``link.mbps``); its
    close (end of stream, or reset) follows the data, as on a wire."""
    send, receive = trio.open_memory_channel[tuple[float, bytes | None]](QUEUED_CHUNKS)

    async def read() -> None:
        async with send:
            wire_free = 0.0  # when the capped link has sent everything before this chunk
            try:
                while chunk := await source.receive_some(CAPPED_CHUNK if link.mbps else CHUNK):
                    arrived = trio.current_time()
                    if link.mbps:
                        wire_free = max(wire_free, arrived) + len(chunk) * 8 / (link.mbps * 1e6)
                        arrived = wire_free
                    await send.send((arrived + link.delay, chunk))
            except trio.BrokenResourceError:  # reset: what it sent before still arrives, then the reset
                await send.send((max(wire_free, trio.current_time()) + link.delay, None))

    async def write() -> None:
        async with receive:
            async for due, chunk in receive:
                await _wait_until(due)
                if chunk is None:
                    sink.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    raise _Vanished  # closing with linger 0 resets the sink's connection too
                await sink.send_all(chunk)
        # the source closed its sending half and everything it sent is delivered: pass the close on
        await sink.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(write)


async def _proxy_connection(downstream: trio.SocketStream, to: tuple[str, int], forward: Link, back: Link) -> None:
    try:
        async with downstream:
            with trio.fail_after(30):
                upstream = await trio.open_tcp_stream(*to)
            async with upstream:
                _no_delay(downstream)
                _no_delay(upstream)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_carry, downstream, upstream, forward)
                    nursery.start_soon(_carry, upstream, downstream, back)
    except* (_Vanished, OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        pass  # a side vanished (or ``to`` did not answer): leaving the ``async with`` blocks closed both legs


async def serve_delay_proxy(listen: tuple[str, int], to: tuple[str, int], forward: Link, back: Link | None = None,
                            *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept on ``listen`` and proxy each connection to ``to``: ``forward`` delays what the
    connecting side sends, ``back`` (default: the same) what comes back. ``task_status.started``
    gets the (host, port) it listens on. Runs until cancelled."""
    back = back or forward
    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
    async with trio.open_nursery() as nursery:
        address = listeners[0].socket.getsockname()[:2]
        nursery.start_soon(trio.serve_listeners, lambda s: _proxy_connection(s, to, forward, back), listeners)
        task_status.started(address)


class DelayProxy:
    """A delay proxy on a thread of its own: ``with DelayProxy(to, 0.025) as proxy: proxy.port``."""

    def __init__(self, to: tuple[str, int], delay: float, mbps: float | None = None,
                 listen: tuple[str, int] = ("127.0.0.1", 0), back_delay: float | None = None):
        self.forward = Link(delay, mbps)
        self.back = Link(delay if back_delay is None else back_delay, mbps)
        self.to, self.listen = to, listen
        self.address: tuple[str, int] | None = None
        self._ready = threading.Event()
        self._stop: Callable[[], None] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)

    @property
    def port(self) -> int:
        assert self.address is not None
        return self.address[1]

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        self._ready.wait(30)
        if self.address is None:
            raise RuntimeError(f"the delay proxy did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._stop is not None:
            self._stop()
        self._thread.join(30)

    def _run(self) -> None:
        async def main() -> None:
            async with trio.open_nursery() as nursery:
                token = trio.lowlevel.current_trio_token()
                self._stop = lambda: token.run_sync_soon(nursery.cancel_scope.cancel)
                self.address = await nursery.start(serve_delay_proxy, self.listen, self.to, self.forward, self.back)
                self._ready.set()

        try:
            trio.run(main)
        except BaseException as error:  # reported by __enter__ (start) or lost with the thread
            self._error = error
        finally:
            self._ready.set()


async def _main(listen: tuple[str, int], to: tuple[str, int], forward: Link, back: Link) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_delay_proxy, listen, to, forward, back)
            cap = f", capped at {forward.mbps:g} Mbit/s" if forward.mbps else ""
            print(f"delay proxy ready at {host}:{port} -> {to[0]}:{to[1]}, {forward.delay * 1e3:g} ms forward and "
                  f"{back.delay * 1e3:g} ms back{cap}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    print("delay proxy stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on (port 0: any free port)")
    parser.add_argument("--to", required=True, help="HOST:PORT to forward each connection to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay, each direction")
    parser.add_argument("--back-delay-ms", type=float, help="one-way delay of the answers (default: --delay-ms)")
    parser.add_argument("--mbps", type=float, help="bandwidth cap in Mbit/s, each direction (default: none)")
    args = parser.parse_args(argv)
    try:
        listen, to = parse_host_port(args.listen), parse_host_port(args.to)
        back_ms = args.delay_ms if args.back_delay_ms is None else args.back_delay_ms
        forward, back = Link(args.delay_ms / 1e3, args.mbps), Link(back_ms / 1e3, args.mbps)
    except ValueError as error:
        parser.error(str(error))
    refused: list[OSError] = []
    try:
        trio.run(_main, listen, to, forward, back)
    except* OSError as group:  # the one place it can come from: listening
        refused.extend(group.exceptions)
    if refused:
        print(f"delay proxy: cannot listen on {args.listen}: {refused[0].strerror or refused[0]}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
