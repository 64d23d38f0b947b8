"""The lean data path under Noise and yamux: what it installs, that the wire is unchanged, and the
check that refuses a py-libp2p it does not fit."""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
import threading
import tomllib
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_pair
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import IncompleteReadError
from libp2p.network.config import ConnectionConfig
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.stream.net_stream import NetStream
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.io import NoiseTransportReadWriter
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.mplex.mplex import MPLEX_PROTOCOL_ID, Mplex
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from noise.connection import NoiseConnection

from petald.p2pnode.transport import host as host_module
from petald.p2pnode.transport.framed_stream import FramedStream
from petald.p2pnode.transport.host import (
    DEFAULT_LISTEN,
    full_addresses,
    make_host,
    parse_peer_address,
    running_host,
)
from petald.p2pnode.transport.identity import load_or_create_identity
from petald.p2pnode.transport.libp2p_internals import (
    LIBP2P_REQUIREMENT,
    BufferedNoiseReadWriter,
    DirectStream,
    EagerLock,
    LeanTransportError,
    LeanYamux,
    check_library,
    require_supported_library,
)
from petald.p2pnode.transport.libp2p_internals.library_check import library_samples, refused_import

ECHO = TProtocol("/petald/test-echo/1.0.0")

# Small, one Noise message; several Noise messages (> 64 KiB); several yamux windows (> 256 KiB).
SIZES = (10, 2400, 200_000, 3_000_000)


async def _echo(stream) -> None:
    framed = FramedStream(stream)
    while (msg := await framed.receive()) is not None:
        await framed.send(msg)
    await framed.close()


def _plain_library_host(key_pair, offer: str = "noise+yamux"):
    """A py-libp2p host as the library builds it, with none of petald's patches; it offers Noise
    and yamux, or plaintext security, or the mplex muxer instead."""
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_pair().private_key)
    security = ({TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(key_pair)} if offer == "plaintext"
                else {TProtocol(NOISE_PROTOCOL_ID): noise})
    muxers = {TProtocol(MPLEX_PROTOCOL_ID): Mplex} if offer == "mplex" else {TProtocol(YAMUX_PROTOCOL_ID): Yamux}
    listen = [multiaddr.Multiaddr(DEFAULT_LISTEN)]
    return new_host(key_pair=key_pair, sec_opt=security, muxer_opt=muxers, listen_addrs=listen,
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
                assert type(muxed) is LeanYamux
                assert isinstance(muxed.secured_conn.conn, BufferedNoiseReadWriter)
                assert isinstance(muxed._write_lock, EagerLock)
                # trio sets TCP_NODELAY on its TCP streams; a small frame must not wait for Nagle.
                sock = muxed.secured_conn.conn.raw.stream.stream.socket
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    trio.run(main)


@contextlib.asynccontextmanager
async def _connected_hosts(protocol, handler):
    """Two petald hosts, the server handling ``protocol`` with ``handler``, the client connected to it:
    (server, client, the server's peer address)."""
    async with running_host(load_or_create_identity(None)) as server, \
            running_host(load_or_create_identity(None)) as client:
        server.set_stream_handler(protocol, handler)
        address = parse_peer_address(full_addresses(server)[0])
        await client.connect(address)
        yield server, client, address


def test_a_peer_that_sends_past_the_yamux_window_is_disconnected_and_its_bytes_dropped():
    """Issue 22, hole 3: py-libp2p buffered whatever a peer sent past a stream's receive window, so
    bytes on a stream nobody reads grew the node's memory without bound. The hostile side writes
    raw DATA frames, ignoring its send window; the other side's handler never reads."""
    import struct

    from libp2p.stream_muxer.yamux.yamux import TYPE_DATA, YAMUX_HEADER_FORMAT

    from petald.p2pnode.transport.libp2p_internals.window_limit import WINDOW_SLACK_BYTES

    sink, blast, frame = TProtocol("/petald-test/sink/1"), 32 * 1024 * 1024, 1024 * 1024

    async def never_reads(stream) -> None:
        await trio.sleep(60)

    async def main():
        async with _connected_hosts(sink, never_reads) as (server, client, address):
            stream = await client.new_stream(address.peer_id, [sink])
            muxed = stream.muxed_stream
            (served,) = _muxed_conns(server)
            with trio.fail_after(10):
                while muxed.stream_id not in served.streams:  # the stream's opening is on its way
                    await trio.sleep(0.01)
            window = served.streams[muxed.stream_id].recv_window
            most, sent = 0, 0
            with trio.fail_after(30):
                try:
                    while sent < blast:
                        header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, muxed.stream_id, frame)
                        await muxed.conn._write_frame(header + bytes(frame))
                        sent += frame
                        most = max(most, sum(len(b) for b in served.stream_buffers.values()))
                except Exception:
                    pass  # the server closed the connection under the writes
                await served.event_closed.wait()
            assert most <= window + WINDOW_SLACK_BYTES  # never more than the window and the slack
            assert not served.stream_buffers

    trio.run(main)


def _identified(host, other) -> bool:
    """``host`` has read ``other``'s identify answer."""
    try:
        return bool(host.get_peerstore().get_protocols(other.get_id()))
    except Exception:  # no entry for it yet
        return False


def test_small_frames_take_the_direct_path_and_the_rest_the_library(monkeypatch):
    # NetStream.write is instrumented, not replaced: it still sends, and the count shows which
    # frames the library's write path carried (the direct path never calls it).
    library_writes: list[int] = []
    library_write = NetStream.write

    async def counting_write(self, data: bytes) -> None:
        if self.get_protocol() == ECHO:  # not identify's or ping's frames
            library_writes.append(len(data))
        await library_write(self, data)

    monkeypatch.setattr(NetStream, "write", counting_write)

    async def main():
        async with _connected_hosts(ECHO, _echo) as (server, client, info):
            # connect returns before identify's exchange is over; a frame written meanwhile finds
            # the connection's write lock taken and rightly goes the library's way.
            with trio.fail_after(10):
                while not (_identified(client, server) and _identified(server, client)):
                    await trio.sleep(0.01)
            framed = FramedStream(await client.new_stream(info.peer_id, [ECHO]))
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


@pytest.mark.parametrize("offer", ["plaintext", "mplex"])
def test_a_petald_host_takes_noise_and_yamux_only(offer):
    async def main():
        plain, listen = _plain_library_host(load_or_create_identity(None), offer)
        async with plain.run(listen_addrs=listen), running_host(load_or_create_identity(None)) as petald:
            with trio.fail_after(20):
                with pytest.raises(Exception) as refused:
                    await plain.connect(parse_peer_address(full_addresses(petald)[0]))
            assert not isinstance(refused.value, trio.TooSlowError)
            assert not petald.get_network().connections

    trio.run(main)


class _Chunks:
    """A raw connection that hands out prepared chunks, then end of stream."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = list(chunks)

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.chunks.pop(0) if self.chunks else b""


def _noise_pair() -> tuple[NoiseConnection, NoiseConnection]:
    """The two ends of a finished Noise handshake (NN: no static keys), from libp2p's Noise package."""
    sender = NoiseConnection.from_name(b"Noise_NN_25519_ChaChaPoly_SHA256")
    receiver = NoiseConnection.from_name(b"Noise_NN_25519_ChaChaPoly_SHA256")
    sender.set_as_initiator()
    receiver.set_as_responder()
    for end in (sender, receiver):
        end.start_handshake()
    receiver.read_message(sender.write_message())
    sender.read_message(receiver.write_message())
    return sender, receiver


def _reader(chunks: list[bytes], cipher: NoiseConnection) -> BufferedNoiseReadWriter:
    return BufferedNoiseReadWriter(NoiseTransportReadWriter(_Chunks(chunks), cipher))


def test_buffered_noise_reader_cuts_messages_across_any_split():
    bodies = [b"a", b"", b"x" * 65_000, b"zz"]
    for cut in (1, 2, 3, 7, 19, 65_003, 65_040):
        sender, receiver = _noise_pair()
        wire = b"".join(len(sealed).to_bytes(2, "big") + sealed for sealed in map(sender.encrypt, bodies))
        reader = _reader([wire[:cut], wire[cut:]], receiver)

        async def read_all(reader=reader):
            return [await reader.read_msg() for _ in bodies]

        assert trio.run(read_all) == bodies, cut


@pytest.mark.parametrize("chunks, received", [([], 0), ([b"\x00"], 1), ([b"\x00\x05abc"], 5)])
def test_buffered_noise_reader_reports_a_close_like_the_library(chunks, received):
    async def read():
        return await _reader(chunks, _noise_pair()[1]).read_msg()

    with pytest.raises(IncompleteReadError) as info:
        trio.run(read)
    assert info.value.received_bytes == received
    assert info.value.is_clean_close == (received == 0)


def test_pyproject_asks_for_the_libp2p_range_the_check_enforces():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    libp2p = [d for d in pyproject["project"]["dependencies"] if d.split(">")[0].split("<")[0].strip() == "libp2p"]
    assert libp2p == [LIBP2P_REQUIREMENT]


@pytest.mark.parametrize("installed", ["0.8.0", "0.9.0", "0.9.0rc1", "1.0.0"])
def test_a_libp2p_outside_the_range_is_refused_naming_both(installed):
    with pytest.raises(LeanTransportError) as info:
        check_library(installed)
    assert f"py-libp2p {installed} is installed" in str(info.value)
    assert ">=0.8.1,<0.9" in str(info.value)


def test_the_installed_libp2p_passes_and_so_does_any_0_8_release():
    check_library()
    check_library("0.8.7")  # the version is in range; the objects are the installed library's


def _without(owner: str, name: str):
    """The library's own objects, except that ``owner`` lacks ``name`` (as a new release might)."""
    def samples():
        built = library_samples()
        delattr(built[owner], name)
        return built
    return samples


@pytest.mark.parametrize("owner, name", [("YamuxStream", "window_lock"), ("NetStream", "_state"),
                                         ("Yamux", "stream_buffers"), ("SecureSession", "low_watermark")])
def test_a_missing_library_attribute_is_refused_naming_it(owner, name):
    with pytest.raises(LeanTransportError, match=rf"\n  {owner}\.{name} \(.*\): \w"):
        check_library(samples=_without(owner, name))


@pytest.mark.parametrize("cls, name", [(SecureSession, "read"), (SecureSession, "write"),
                                       (RawConnection, "read"), (RawConnection, "write"),
                                       (NoiseTransport, "secure_inbound"), (NoiseTransport, "secure_outbound")])
def test_a_missing_library_method_is_refused_naming_it(monkeypatch, cls, name):
    # Deleted from the library's class, so the real sample lacks its own: what is left under the
    # name is the interface's abstract stub, which is no method to call or override.
    owner = "NoiseTransport" if cls is NoiseTransport else cls.__name__
    monkeypatch.delattr(cls, name)
    with pytest.raises(LeanTransportError, match=rf"\n  {owner}\.{name} \(a method\): \w"):
        check_library()


def test_a_library_attribute_of_another_kind_is_refused_naming_what_it_must_be():
    def samples():
        built = library_samples()
        built["Yamux"]._write_lock = object()  # say, a release that moved to another lock type
        return built

    with pytest.raises(LeanTransportError, match=r"Yamux\._write_lock \(a trio\.Lock\)"):
        check_library(samples=samples)


def test_a_host_is_not_built_on_a_library_the_check_refuses(monkeypatch):
    built = []
    monkeypatch.setattr(host_module, "new_host", lambda *args, **kwargs: built.append(args or kwargs))
    monkeypatch.setattr(host_module, "LeanNoise", lambda *args, **kwargs: built.append(args or kwargs))

    def refuse() -> None:
        raise LeanTransportError("py-libp2p 9.9.9 is installed; petald's data path is written for ...")

    with pytest.raises(LeanTransportError, match="9.9.9"):
        make_host(load_or_create_identity(None), check_library=refuse)

    async def run():
        async with running_host(load_or_create_identity(None), check_library=refuse):
            pass

    with pytest.raises(LeanTransportError, match="9.9.9"):
        trio.run(run)
    assert built == []


def test_a_host_checks_the_installed_library_unless_told_otherwise():
    for start in (make_host, running_host):
        assert inspect.signature(start).parameters["check_library"].default is require_supported_library


def test_a_failed_import_of_the_data_path_names_the_range_or_the_missing_name():
    gone = ImportError("cannot import name 'HEADER_SIZE'", name="libp2p.stream_muxer.yamux.yamux")
    assert ">=0.8.1,<0.9" in str(refused_import(gone, "0.9.1"))
    assert "cannot import name 'HEADER_SIZE'" in str(refused_import(gone, "0.8.2"))


def test_eager_lock_excludes_and_hands_over_in_order():
    async def main():
        lock = EagerLock()
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
