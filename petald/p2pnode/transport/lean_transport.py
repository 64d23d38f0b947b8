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
``install`` for its yamux connections) and touches only connections of that host. ``check_library``
runs at every host start: it checks the library version range and builds the
patched library objects once, so a release that renames what we rely on stops
petald at start with a clear error instead of misbehaving.
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from types import TracebackType
from typing import Any

import trio
from libp2p.abc import IHost, INetStream, IRawConnection, ISecureConn
from libp2p.io.exceptions import IncompleteReadError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.stream.net_stream import NetStream, StreamState
from libp2p.peer.id import ID
from libp2p.security.noise.io import NoisePacketReadWriter, NoiseTransportReadWriter
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.rw_lock import ReadWriteLock
from libp2p.stream_muxer.yamux import yamux as yamux_module
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

SUPPORTED_LIBP2P = ((0, 8, 1), (0, 9, 0))  # [low, high): the pin range in pyproject.toml
_RECV_BYTES = 64 * 1024  # one Noise message is at most 65537 bytes on the wire
_NOISE_LEN = 2


class LeanTransportError(RuntimeError):
    """The installed py-libp2p is not the one petald's data-path patches were written for."""


class EagerLock:
    """A ``trio.Lock`` whose uncontended acquire does not yield to the scheduler.

    Contended acquires park on the wrapped lock, so waiting, fairness, ownership
    checks and "owner exited without releasing" errors are trio's own. A caller
    that was already cancelled enters the critical section and meets the
    cancellation at its next real checkpoint (every path here does I/O next).
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def acquire(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    def acquire_nowait(self) -> None:
        self._lock.acquire_nowait()

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def statistics(self) -> Any:
        return self._lock.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()


class _EagerSemaphore:
    """``trio.Semaphore`` with the same no-yield fast path (for ``ReadWriteLock``'s writer slot)."""

    __slots__ = ("_sem",)

    def __init__(self, initial_value: int) -> None:
        self._sem = trio.Semaphore(initial_value)

    async def acquire(self) -> None:
        try:
            self._sem.acquire_nowait()
        except trio.WouldBlock:
            await self._sem.acquire()

    def acquire_nowait(self) -> None:
        self._sem.acquire_nowait()

    def release(self) -> None:
        self._sem.release()

    @property
    def value(self) -> int:
        return self._sem.value


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
        return muxed  # type: ignore[return-value]

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
    """Put every connection of ``host`` on the lean path (Noise is ``LeanNoise`` in its options)."""
    check_library()
    muxers = getattr(getattr(host.get_network(), "upgrader", None), "muxer_multistream", None)
    original = getattr(muxers, "new_conn", None)
    if original is None:
        raise LeanTransportError("py-libp2p's swarm has no upgrader.muxer_multistream.new_conn to hook the "
                                 "lean yamux path into (p2pnode/lean_transport.py)")

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


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


_checked = False


def check_library() -> None:
    """Fail loudly if py-libp2p is outside the range, or lacks what the patches replace."""
    global _checked
    if _checked:
        return
    installed = version("libp2p")
    low, high = SUPPORTED_LIBP2P
    if not low <= _version_tuple(installed) < high:
        raise LeanTransportError(
            f"py-libp2p {installed} is installed; petald's data path (p2pnode/lean_transport.py) is written "
            f"for >={'.'.join(map(str, low))},<{'.'.join(map(str, high))}: install a version in that range")
    missing: list[str] = []

    def locks(obj: object, *names: str) -> None:
        missing.extend(f"{type(obj).__name__}.{n} (a trio.Lock)" for n in names
                       if not isinstance(getattr(obj, n, None), trio.Lock))

    try:
        # Build the objects the patches reach into, as the library builds them, and
        # check every attribute we read or replace.
        muxer = Yamux(secured_conn=None, peer_id=None, is_initiator=True)  # type: ignore[arg-type]
        locks(muxer, "streams_lock", "_write_lock")
        stream = YamuxStream(1, muxer, True)
        locks(stream, "window_lock", "close_lock")
        rw = getattr(stream, "rw_lock", None)
        if (type(rw) is not ReadWriteLock or getattr(rw, "_readers", None) != 0
                or not isinstance(getattr(rw, "_readers_lock", None), trio.Lock)
                or not isinstance(getattr(rw, "_writer_lock", None), trio.Semaphore)):
            missing.append("YamuxStream.rw_lock (a ReadWriteLock with _readers, _readers_lock, _writer_lock)")
        tcp = TrioTCPStream(None)  # type: ignore[arg-type]
        locks(tcp, "read_lock", "write_lock")
        raw = RawConnection(tcp, True)
        if getattr(raw, "stream", None) is not tcp:
            missing.append("RawConnection.stream")
        noise_rw = NoiseTransportReadWriter(raw, None)  # type: ignore[arg-type]
        packets = getattr(noise_rw, "read_writer", None)
        if (type(packets) is not NoisePacketReadWriter or getattr(packets, "size_len_bytes", None) != _NOISE_LEN
                or getattr(packets, "read_write_closer", None) is not raw or not hasattr(noise_rw, "noise_state")):
            missing.append("NoiseTransportReadWriter.read_writer (a NoisePacketReadWriter with 2-byte lengths)")
        for cls, names in ((Yamux, ("_write_frame", "_read_data_body", "open_stream", "accept_stream")),
                           (NoiseTransport, ("secure_inbound", "secure_outbound")),
                           (NoiseTransportReadWriter, ("read_msg", "decrypt", "encrypt", "prefix")),
                           (SecureSession, ("read", "write", "_drain")),
                           (YamuxStream, ("_auto_tune_and_send_window_update",))):
            missing += [f"{cls.__name__}.{n}" for n in names if not hasattr(cls, n)]
        # What direct_frames reads and updates on the library's objects.
        for obj, names in ((muxer, ("streams", "stream_buffers", "stream_events", "event_shutting_down")),
                           (stream, ("stream_id", "send_window", "send_closed", "recv_closed", "closed",
                                     "reset_received"))):
            missing += [f"{type(obj).__name__}.{n}" for n in names if not hasattr(obj, n)]
        net_stream = NetStream(stream, None, None)
        locks(net_stream, "_state_lock")
        if not isinstance(getattr(net_stream, "_state", None), StreamState):
            missing.append("NetStream._state (a StreamState)")
        session = SecureSession(local_peer=None, local_private_key=None, remote_peer=None,  # type: ignore[arg-type]
                                remote_permanent_pubkey=None, is_initiator=True, conn=noise_rw)
        if not (getattr(session, "low_watermark", None) == 0 == getattr(session, "high_watermark", None)):
            missing.append("SecureSession.low_watermark, high_watermark")
        if packets.encode_msg(b"abc") != b"\x00\x03abc":  # direct_frames writes Noise packets itself
            missing.append("NoisePacketReadWriter.encode_msg (a 2-byte big-endian length, then the message)")
        if not isinstance(getattr(yamux_module, "logger", None), logging.Logger):
            missing.append("yamux.logger")
    except Exception as exc:
        missing.append(f"building the library objects failed: {type(exc).__name__}: {exc}")
    if missing:
        raise LeanTransportError(
            f"py-libp2p {installed} does not have what p2pnode/lean_transport.py patches: {', '.join(missing)}")
    _checked = True
