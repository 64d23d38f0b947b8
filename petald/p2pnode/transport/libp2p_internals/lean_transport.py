"""A leaner data path under py-libp2p's Noise and yamux, for petald's own hosts only.

Nothing here changes a byte on the wire: the frames, their order and the window
accounting are the library's; a petald host talks to an unpatched py-libp2p (or
go-libp2p) peer exactly as before. What changes is how many times the trio
scheduler runs per frame, which is what a small request/response pays for on
loopback (docs/benchmarks.md has the figures):

- trio's ``Lock.acquire`` yields to the scheduler even when nobody holds the
  lock, and one yamux frame takes up to six such locks on its way (stream
  read/write lock, window lock, connection write lock, TCP read or write lock,
  streams lock). ``EagerLock`` takes a free lock without the yield and waits
  exactly like ``trio.Lock`` when it is held. Each socket send or receive still
  yields once (trio's own socket methods do), so no task can starve the loop.
- Noise reads its 2-byte length and then its body in two ``recv`` calls, through
  two locks. ``BufferedNoiseReadWriter`` receives whatever TCP has (up to 64 KiB)
  and cuts Noise messages out of its buffer: usually one ``recv`` per message,
  fewer when several arrive together.
- yamux's ``_write_frame`` unpacks and formats every header for a debug log line
  that is off, then yields once more after the send; ``LeanYamux`` formats only
  when debug logging is on and leaves the yield to the send itself; its
  ``_read_data_body`` takes a body already in the decrypted Noise buffer directly.
  (``direct_frames`` goes further for petald's own frames, on the same objects.)

Everything is installed by ``host.make_host`` (``LeanNoise`` as the host's Noise,
``install`` for its yamux connections) and touches only connections of that host. Every
library internal used here is listed, with its reason, in ``library_check.INTERNALS``, which
is checked at every host start.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import trio
from libp2p.abc import IHost, INetStream, IRawConnection, ISecureConn
from libp2p.io.exceptions import IncompleteReadError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.stream.net_stream import NetStream
from libp2p.peer.id import ID
from libp2p.security.noise.io import NoiseTransportReadWriter
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.rw_lock import ReadWriteLock
from libp2p.stream_muxer.yamux import yamux as yamux_module
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

from petald.p2pnode.transport.libp2p_internals.library_check import (
    LeanTransportError,
    require_supported_library,
)
from petald.p2pnode.transport.libp2p_internals.pipelined_select import pipeline_negotiations
from petald.p2pnode.transport.libp2p_internals.window_limit import WindowedBuffers

_RECV_BYTES = 64 * 1024  # one Noise message is at most 65537 bytes on the wire
_NOISE_LEN = 2


class _EagerAcquire:
    """The fast path of ``EagerLock`` and ``_EagerSemaphore``: take a free one without a yield.

    Contended acquires park on the trio primitive underneath, so waiting, fairness, ownership
    checks and "owner exited without releasing" errors are trio's own. A caller that was
    already cancelled enters the critical section and meets the cancellation at its next real
    checkpoint (every path here does I/O next).
    """

    __slots__ = ("_inner",)
    _inner: trio.Lock | trio.Semaphore

    async def acquire(self) -> None:
        try:
            self._inner.acquire_nowait()
        except trio.WouldBlock:
            await self._inner.acquire()

    def acquire_nowait(self) -> None:
        self._inner.acquire_nowait()

    def release(self) -> None:
        self._inner.release()


class EagerLock(_EagerAcquire):
    """A ``trio.Lock`` whose uncontended acquire does not yield to the scheduler."""

    __slots__ = ()
    _inner: trio.Lock

    def __init__(self) -> None:
        self._inner = trio.Lock()

    def locked(self) -> bool:
        return self._inner.locked()

    def statistics(self) -> Any:
        return self._inner.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()


class _EagerSemaphore(_EagerAcquire):
    """``trio.Semaphore`` with the same no-yield fast path (for ``ReadWriteLock``'s writer slot)."""

    __slots__ = ()
    _inner: trio.Semaphore

    def __init__(self, initial_value: int) -> None:
        self._inner = trio.Semaphore(initial_value)

    @property
    def value(self) -> int:
        return self._inner.value


class EagerReadWriteLock(ReadWriteLock):
    """libp2p's ``ReadWriteLock`` on eager primitives (same logic, no yield when free)."""

    def __init__(self) -> None:
        super().__init__()
        self._readers_lock = EagerLock()  # type: ignore[assignment]
        self._writer_lock = _EagerSemaphore(1)  # type: ignore[assignment]


def _swap_free_lock(owner: object, name: str, make: Any) -> None:
    # Swapping is safe only while nobody holds or waits on the old lock; trio is
    # single-threaded, so "not locked now" cannot change before the assignment.
    lock = getattr(owner, name)
    if isinstance(lock, trio.Lock) and not lock.locked():
        setattr(owner, name, make())


def lean_stream(stream: YamuxStream) -> None:
    _swap_free_lock(stream, "window_lock", EagerLock)
    _swap_free_lock(stream, "close_lock", EagerLock)
    rw = stream.rw_lock
    if type(rw) is ReadWriteLock and rw._readers == 0 and not rw._readers_lock.locked() and rw._writer_lock.value == 1:
        stream.rw_lock = EagerReadWriteLock()


def lean_net_stream(stream: INetStream) -> None:
    """Eager state lock on one of petald's own streams (the host's other protocols keep the library's).

    ``NetStream`` takes its state lock on every read and write, a scheduler pass
    each; the state checks under it are unchanged.
    """
    if isinstance(stream, NetStream):
        _swap_free_lock(stream, "_state_lock", EagerLock)


class LeanYamux(Yamux):
    """yamux with eager locks and a write path without per-frame debug formatting.

    py-libp2p 0.8's muxer negotiation builds ``Yamux`` by name whatever class the
    host's muxer options give, so ``install`` adopts each new connection of a petald
    host into this class right after it is built, before it reads or writes a frame.
    """

    @classmethod
    def adopt(cls, muxed: Yamux) -> LeanYamux:
        muxed.__class__ = cls  # same layout: a subclass that only overrides methods
        _swap_free_lock(muxed, "streams_lock", EagerLock)
        _swap_free_lock(muxed, "_write_lock", EagerLock)
        for stream in list(muxed.streams.values()):
            lean_stream(stream)
        muxed.stream_buffers = WindowedBuffers(muxed, muxed.stream_buffers)
        muxed.window_exceeded_by = 0
        return muxed  # type: ignore[return-value]

    def exceeded_window(self, stream_id: int, over: int) -> None:
        """The peer sent ``over`` bytes past stream ``stream_id``'s window (``window_limit``): the
        reader stops at its next frame and ``handle_incoming`` closes the connection."""
        if not self.window_exceeded_by:
            yamux_module.logger.warning("yamux peer %s sent %d bytes past the receive window of stream %d; "
                                        "disconnecting it", self.peer_id, over, stream_id)
        self.window_exceeded_by = over
        self.event_shutting_down.set()

    async def handle_incoming(self) -> None:
        await super().handle_incoming()
        # The library's reader returns without closing anything when it sees the shutdown flag.
        if self.window_exceeded_by and not self.event_closed.is_set():
            await self._cleanup_on_error()

    async def _write_frame(self, data: bytes) -> None:
        if yamux_module.logger.isEnabledFor(logging.DEBUG):
            await super()._write_frame(data)  # the library's path, with its TX log line
            return
        async with self._write_lock:
            # The socket send below yields once, as trio's sends do: the library's
            # extra checkpoint after it would only add a scheduler pass.
            await self.secured_conn.write(data)

    async def _read_data_body(self, length: int) -> bytes:
        # A small frame's body nearly always came in the same Noise message as its header, so
        # it is in the session's buffer already: take it without the library's per-frame
        # timeout scope (which also re-reads an environment variable) and read_exactly loop.
        session = self.secured_conn
        if type(session) is SecureSession and session.high_watermark - session.low_watermark >= length:
            return session._drain(length)
        return await super()._read_data_body(length)

    async def open_stream(self) -> YamuxStream:
        stream = await super().open_stream()
        lean_stream(stream)
        return stream

    async def accept_stream(self) -> Any:
        stream = await super().accept_stream()
        if isinstance(stream, YamuxStream):
            lean_stream(stream)
        return stream


def install(host: IHost) -> None:
    """Put every connection of ``host`` on the lean path (Noise is ``LeanNoise`` in its options), and
    its protocol negotiations on one round trip each (``pipelined_select``)."""
    require_supported_library()
    pipeline_negotiations(host)
    muxers = getattr(getattr(host.get_network(), "upgrader", None), "muxer_multistream", None)
    original = getattr(muxers, "new_conn", None)
    if original is None:
        raise LeanTransportError("py-libp2p's swarm has no upgrader.muxer_multistream.new_conn to hook the "
                                 "lean yamux path into (p2pnode/transport/libp2p_internals)")

    async def new_conn(conn: ISecureConn, peer_id: ID) -> Any:
        muxed = await original(conn, peer_id)
        if type(muxed) is Yamux:
            LeanYamux.adopt(muxed)
        return muxed

    muxers.new_conn = new_conn


class BufferedNoiseReadWriter(NoiseTransportReadWriter):
    """Noise transport messages cut from a receive buffer: one ``recv`` per message or fewer.

    Reads the raw connection as the library does (``RawConnection.read``, with its
    error mapping), only in 64 KiB gulps instead of exactly-2-then-exactly-N bytes.
    Writes are the library's own. Only used once the handshake is over, so no
    handshake byte can be left in our buffer.
    """

    def __init__(self, transport_rw: NoiseTransportReadWriter) -> None:
        super().__init__(transport_rw.read_writer.read_write_closer, transport_rw.noise_state)
        self.raw = transport_rw.read_writer.read_write_closer  # a RawConnection (lean_secure_session checks)
        self._buffer = bytearray()

    async def read_msg(self, prefix_encoded: bool = False) -> bytes:
        buffer = self._buffer
        while True:
            have = len(buffer)
            if have >= _NOISE_LEN:
                end = _NOISE_LEN + ((buffer[0] << 8) | buffer[1])
                if have >= end:
                    encrypted = bytes(buffer[_NOISE_LEN:end])
                    del buffer[:end]
                    if prefix_encoded:
                        encrypted = encrypted[len(self.prefix):]
                    return self.decrypt(encrypted)
            data = await self.raw.read(_RECV_BYTES)
            if not data:
                # What the library's read_exactly raises: a clean close when nothing of
                # the next message had arrived, a truncated message otherwise.
                wanted = _NOISE_LEN if have < _NOISE_LEN else _NOISE_LEN + ((buffer[0] << 8) | buffer[1])
                raise IncompleteReadError(
                    f"Connection closed during read operation: expected {wanted} bytes but received {have} bytes",
                    expected_bytes=wanted, received_bytes=have)
            buffer += data


def _lean_raw(raw: Any) -> bool:
    """Eager locks on the TCP stream under ``raw``; False when it is not a TCP connection we know."""
    if type(raw) is not RawConnection or type(raw.stream) is not TrioTCPStream:
        return False
    _swap_free_lock(raw.stream, "read_lock", EagerLock)
    _swap_free_lock(raw.stream, "write_lock", EagerLock)
    return True


def lean_secure_session(session: ISecureConn) -> ISecureConn:
    """Put a finished Noise session over TCP on the buffered reader; leave anything else as it is."""
    if type(session) is SecureSession and type(session.conn) is NoiseTransportReadWriter:
        if _lean_raw(session.conn.read_writer.read_write_closer):
            session.conn = BufferedNoiseReadWriter(session.conn)
    return session


class LeanNoise(NoiseTransport):
    """The library's Noise XX handshake; afterwards, the buffered transport reader."""

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        return lean_secure_session(await super().secure_inbound(conn))

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        return lean_secure_session(await super().secure_outbound(conn, peer_id))
