"""Frames straight between a FramedStream and its yamux stream, past py-libp2p's call layers.

On its way out, a frame passes NetStream.write -> YamuxStream.write -> Yamux._write_frame ->
SecureSession.write -> Noise write_msg -> packet write_msg -> RawConnection.write ->
TrioTCPStream.write: eight async calls, several locks and state checks and three copies; on
its way in, NetStream.read -> YamuxStream.read -> Yamux.read_stream, with half a dozen
always-formatted debug lines. On a decode hop this code runs cold (the forward has just
evicted the caches), so its length, not the bytes moved, is what a hop pays for
(docs/benchmarks.md, "Where the per-hop time goes").

``DirectStream`` does the common case in one place, on the library's own state, locks and
window accounting, and leaves every other case to the library:

- write: a frame that fits one Noise message, on an open stream with enough send window,
  while no other task is writing on the stream or the connection, goes out as one yamux DATA
  frame in one Noise message in one socket write: byte for byte what the library sends for
  it. Larger frames, a short window, a closed or reset stream, a busy connection: the library.
- read: bytes buffered for an open stream are taken directly and credited back to the peer
  as the library does; an empty buffer is waited on through the library's own event. A
  stream that is closing, closed, reset or gone goes to the library, which answers as it
  always has (data left over, end of stream, or its exception).

Only petald's own connections qualify (``LeanYamux`` over buffered Noise over TCP, as
``lean_transport`` builds them); every library attribute read here is listed, with its reason,
in ``library_check.INTERNALS``, which is checked at every host start.
"""

from __future__ import annotations

import struct

import trio
from libp2p.abc import INetStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.stream.exceptions import StreamError
from libp2p.network.stream.net_stream import NetStream, StreamState
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.yamux.yamux import HEADER_SIZE, TYPE_DATA, YAMUX_HEADER_FORMAT, YamuxStream

from petald.p2pnode.transport.libp2p_internals.lean_transport import (
    BufferedNoiseReadWriter,
    LeanYamux,
)

_YAMUX_HEADER = struct.Struct(YAMUX_HEADER_FORMAT)
MAX_DIRECT_FRAME = MAX_PLAINTEXT_LENGTH - HEADER_SIZE  # one yamux frame in one Noise message
_WRITABLE = (StreamState.OPEN, StreamState.CLOSE_READ)
_READABLE = (StreamState.OPEN, StreamState.CLOSE_WRITE)


class DirectStream:
    """The direct path of one petald stream; ``of`` gives None for any other kind of stream."""

    __slots__ = ("net", "muxed", "conn", "noise", "raw")

    def __init__(self, net: NetStream, muxed: YamuxStream, conn: LeanYamux, noise: BufferedNoiseReadWriter,
                 raw: RawConnection):
        self.net, self.muxed, self.conn, self.noise, self.raw = net, muxed, conn, noise, raw

    @classmethod
    def of(cls, stream: INetStream) -> DirectStream | None:
        muxed = getattr(stream, "muxed_stream", None)
        conn = getattr(muxed, "conn", None)
        session = getattr(conn, "secured_conn", None)
        noise = getattr(session, "conn", None)
        if (type(stream) is not NetStream or type(muxed) is not YamuxStream or type(conn) is not LeanYamux
                or type(session) is not SecureSession or type(noise) is not BufferedNoiseReadWriter
                or type(noise.raw) is not RawConnection):
            return None
        return cls(stream, muxed, conn, noise, noise.raw)

    def discard_unread(self) -> None:
        """Drop the bytes the connection holds for this stream, unread and uncredited (the stream is
        being reset: the library would keep them until its sweeper's grace period ends)."""
        buffer = self.conn.stream_buffers.get(self.muxed.stream_id)
        if buffer:
            buffer.clear()

    async def write(self, frame: bytes) -> bool:
        """Send ``frame`` as one yamux DATA frame; False, with nothing sent, when the library must."""
        net, muxed, conn = self.net, self.muxed, self.conn
        size = len(frame)
        # Everything the library checks before it sends (states, window), and no writer under way
        # that our frame could overtake. No await until the lock is ours, so nothing changes meanwhile.
        if (size > MAX_DIRECT_FRAME or net._state not in _WRITABLE or muxed.send_closed or muxed.closed
                or muxed.send_window < size or muxed.rw_lock._writer_lock.value == 0
                or muxed.window_lock.locked() or conn._write_lock.locked()):
            return False
        muxed.send_window -= size
        plaintext = _YAMUX_HEADER.pack(0, TYPE_DATA, 0, muxed.stream_id, size) + frame
        async with conn._write_lock:  # an EagerLock, free: taken without a scheduler pass
            # Encrypted under the connection's write lock, as the library does: Noise nonces
            # must reach the socket in the order they were used.
            encrypted = self.noise.encrypt(plaintext)
            try:
                await self.raw.write(len(encrypted).to_bytes(2, "big") + encrypted)
            except Exception as error:  # what NetStream.write makes of a transport failure
                net._state = StreamState.ERROR
                raise StreamError(f"Write operation failed: {error}") from error
        return True

    async def read(self, limit: int) -> bytes | None:
        """Up to ``limit`` bytes, waiting for some; None when the library must answer instead."""
        net, muxed, conn = self.net, self.muxed, self.conn
        sid = muxed.stream_id
        while True:
            buffer = conn.stream_buffers.get(sid)
            event = conn.stream_events.get(sid)
            if (net._state not in _READABLE or muxed.recv_closed or muxed.reset_received or muxed.closed
                    or buffer is None or event is None or conn.streams.get(sid) is not muxed
                    or conn.event_shutting_down.is_set()):
                return None
            if buffer:
                data = bytes(buffer[:limit])
                del buffer[:limit]
                try:
                    await muxed._auto_tune_and_send_window_update(bytes_read=len(data))
                except Exception as error:  # what NetStream.read makes of a failed window update
                    net._state = StreamState.ERROR
                    raise StreamError(f"Read operation failed: {error}") from error
                return data
            await event.wait()  # set by the connection's reader for data, FIN, RST or shutdown
            if conn.stream_events.get(sid) is event:  # not when the stream was finalized meanwhile
                conn.stream_events[sid] = trio.Event()

