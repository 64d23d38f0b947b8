"""The lean data path under Noise and yamux: what it installs, that the wire is unchanged, its guards."""

from __future__ import annotations

import os
import socket
import threading

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_pair
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import IncompleteReadError
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.net_stream import NetStream
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from petald.p2pnode.transport import lean_transport
from petald.p2pnode.transport.direct_frames import DirectStream
from petald.p2pnode.transport.framed_stream import FramedStream
from petald.p2pnode.transport.host import (
    DEFAULT_LISTEN,
    full_addresses,
    make_host,
    parse_peer_address,
    running_host,
)
from petald.p2pnode.transport.identity import load_or_create_identity

ECHO = TProtocol("/petald/test-echo/1.0.0")

# Small, one Noise message; several Noise messages (> 64 KiB); several yamux windows (> 256 KiB).
SIZES = (10, 2400, 200_000, 3_000_000)


async def _echo(stream) -> None:
    framed = FramedStream(stream)
    while (msg := await framed.receive()) is not None:
        await framed.send(msg)
    await framed.close()


def _plain_library_host(key_pair):
    """A py-libp2p host as the library builds it (Noise + yamux), with none of petald's patches."""
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_pair().private_key)
    listen = [multiaddr.Multiaddr(DEFAULT_LISTEN)]
    return new_host(key_pair=key_pair, sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
                    muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux}, listen_addrs=listen,
                    connection_config=ConnectionConfig(min_connections=0, low_watermark=0,
                                                       auto_connect_interval=3600.0)), listen


async def _round_trips(client_host, server_address: str) -> list[int]:
    info = parse_peer_address(server_address)
    await client_host.connect(info)
    framed = FramedStream(await client_host.new_stream(info.peer_id, [ECHO]))
    sizes = []
    for size in SIZES:
        payload = os.urandom(size)
        await framed.send({"type": "echo", "data": payload})
        with trio.fail_after(30):
            reply = await framed.receive()
        assert reply == {"type": "echo", "data": payload}
        sizes.append(len(reply["data"]))
    await framed.close()
    return sizes


def _muxed_conns(host) -> list:
    conns = []
    for value in host.get_network().connections.values():
        for conn in value if isinstance(value, list) else [value]:
            conns.append(conn.muxed_conn)
    return conns


def test_petald_hosts_run_the_lean_path_end_to_end():
    async def main():
        async with running_host(load_or_create_identity(None)) as server, \
                running_host(load_or_create_identity(None)) as client:
            server.set_stream_handler(ECHO, _echo)
            assert await _round_trips(client, full_addresses(server)[0]) == list(SIZES)
            for host in (client, server):
                (muxed,) = _muxed_conns(host)
                assert type(muxed) is lean_transport.LeanYamux
                assert isinstance(muxed.secured_conn.conn, lean_transport.BufferedNoiseReadWriter)
                assert isinstance(muxed._write_lock, lean_transport.EagerLock)
                # trio sets TCP_NODELAY on its TCP streams; a small frame must not wait for Nagle.
                sock = muxed.secured_conn.conn.raw.stream.stream.socket
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    trio.run(main)


def test_small_frames_take_the_direct_path_and_the_rest_the_library(monkeypatch):
    library_writes: list[int] = []
    library_write = NetStream.write

    async def counting_write(self, data: bytes) -> None:
        if self.get_protocol() == ECHO:  # not identify's or ping's frames
            library_writes.append(len(data))
        await library_write(self, data)

    monkeypatch.setattr(NetStream, "write", counting_write)

    async def main():
        async with running_host(load_or_create_identity(None)) as server, \
                running_host(load_or_create_identity(None)) as client:
            server.set_stream_handler(ECHO, _echo)
            info = parse_peer_address(full_addresses(server)[0])
            await client.connect(info)
            framed = FramedStream(await client.new_stream(info.peer_id, [ECHO]))
            assert framed._direct is not None
            for size, via_library in ((10, False), (2400, False), (200_000, True)):
                library_writes.clear()
                await framed.send({"type": "echo", "data": b"x" * size})
                with trio.fail_after(30):
                    assert (await framed.receive())["data"] == b"x" * size
                # Both ends: the client's frame and the echo server's reply.
                assert (len(library_writes) == 2) is via_library, (size, library_writes)
            await framed.close()

    trio.run(main)


def test_a_library_connection_keeps_the_library_path():
    async def main():
        plain, listen = _plain_library_host(load_or_create_identity(None))
        async with plain.run(listen_addrs=listen), running_host(load_or_create_identity(None)) as server:
            server.set_stream_handler(ECHO, _echo)
            info = parse_peer_address(full_addresses(server)[0])
            await plain.connect(info)
            stream = await plain.new_stream(info.peer_id, [ECHO])
            assert DirectStream.of(stream) is None
            await stream.reset()

    trio.run(main)


@pytest.mark.parametrize("petald_side", ["client", "server"])
def test_the_wire_is_unchanged_for_an_unpatched_library_peer(petald_side):
    async def main():
        plain, listen = _plain_library_host(load_or_create_identity(None))
        async with plain.run(listen_addrs=listen), running_host(load_or_create_identity(None)) as petald:
            client, server = (petald, plain) if petald_side == "client" else (plain, petald)
            server.set_stream_handler(ECHO, _echo)
            assert await _round_trips(client, full_addresses(server)[0]) == list(SIZES)
            (plain_conn,) = _muxed_conns(plain)
            assert type(plain_conn) is Yamux  # the library's own, unpatched, on the other end

    trio.run(main)


class _Chunks:
    """A raw connection that hands out prepared chunks, then end of stream."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = list(chunks)

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.chunks.pop(0) if self.chunks else b""


def _reader(chunks: list[bytes]) -> lean_transport.BufferedNoiseReadWriter:
    reader = object.__new__(lean_transport.BufferedNoiseReadWriter)
    reader.raw = _Chunks(chunks)
    reader._buffer = bytearray()
    reader.decrypt = lambda data: b"plain:" + data  # the framing is under test, not the cipher
    return reader


def test_buffered_noise_reader_cuts_messages_across_any_split():
    wire = b"".join(len(body).to_bytes(2, "big") + body for body in (b"a", b"", b"x" * 65_000, b"zz"))
    for cut in (1, 2, 3, 7, 65_003, len(wire) - 1):
        reader = _reader([wire[:cut], wire[cut:]])

        async def read_all(reader=reader):
            return [await reader.read_msg() for _ in range(4)]

        assert trio.run(read_all) == [b"plain:a", b"plain:", b"plain:" + b"x" * 65_000, b"plain:zz"]


@pytest.mark.parametrize("chunks, received", [([], 0), ([b"\x00"], 1), ([b"\x00\x05abc"], 5)])
def test_buffered_noise_reader_reports_a_close_like_the_library(chunks, received):
    async def read():
        return await _reader(chunks).read_msg()

    with pytest.raises(IncompleteReadError) as info:
        trio.run(read)
    assert info.value.received_bytes == received
    assert info.value.is_clean_close == (received == 0)


def test_an_unsupported_libp2p_version_stops_the_host_at_start(monkeypatch):
    monkeypatch.setattr(lean_transport, "_checked", False)
    monkeypatch.setattr(lean_transport, "version", lambda name: "0.9.0")
    with pytest.raises(lean_transport.LeanTransportError, match="0.9.0"):
        make_host(load_or_create_identity(None))


def test_a_missing_library_attribute_stops_the_host_at_start(monkeypatch):
    monkeypatch.setattr(lean_transport, "_checked", False)
    original = lean_transport.YamuxStream.__init__

    def without_window_lock(self, *args, **kwargs):
        original(self, *args, **kwargs)
        del self.window_lock

    monkeypatch.setattr(lean_transport.YamuxStream, "__init__", without_window_lock)
    with pytest.raises(lean_transport.LeanTransportError, match="window_lock"):
        lean_transport.check_library()


def test_eager_lock_excludes_and_hands_over_in_order():
    async def main():
        lock = lean_transport.EagerLock()
        order = []

        async def worker(name: str):
            async with lock:
                order.append(f"{name} in")
                await trio.sleep(0.01)
                order.append(f"{name} out")

        async with trio.open_nursery() as nursery:
            for name in "abc":
                nursery.start_soon(worker, name)
                await trio.sleep(0.001)
        assert order == ["a in", "a out", "b in", "b out", "c in", "c out"]
        assert not lock.locked()

    trio.run(main)


def test_executor_hand_off_returns_raises_and_abandons_on_cancel():
    from petald.p2pnode.server.executor_bridge import await_completion

    release = threading.Event()

    def on_a_thread(fn):
        """A submit function that runs ``fn`` on another thread, as the executor does."""
        def submit(done):
            def run():
                try:
                    result = fn()
                except BaseException as exc:  # handed to the waiting task
                    done(None, exc)
                else:
                    done(result, None)
            threading.Thread(target=run, daemon=True).start()
        return submit

    def boom():
        raise ValueError("from the executor")

    async def main():
        assert await await_completion(on_a_thread(lambda: 41 + 1)) == 42
        with pytest.raises(ValueError, match="from the executor"):
            await await_completion(on_a_thread(boom))
        with trio.move_on_after(0.05) as scope:
            await await_completion(on_a_thread(release.wait))  # finishes only when released
        assert scope.cancelled_caught
        release.set()  # the abandoned job completes now; its result must be dropped quietly
        await trio.sleep(0.05)
        assert await await_completion(on_a_thread(lambda: "after")) == "after"

    trio.run(main)
