"""A yamux peer that sends past the receive window it was given is disconnected; its bytes are dropped.

py-libp2p 0.8.1 logs "peer exceeded receive window" and buffers the bytes anyway, so a peer could
make a node hold any amount of memory on a stream nobody reads (issue 22, hole 3: 200 MiB of DATA
past the window grew a server's RSS by 200 MB for good). go-yamux ends the session on it; so does
``LeanYamux`` (``lean_transport``): each stream's receive buffer is a ``WindowedBuffer``, which
refuses bytes past the stream's window and marks the connection for closing.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Bytes past its window a peer may send on one stream in all, before it is disconnected. A
# correct peer sends none (its send window mirrors this side's receive window); the slack only
# covers a difference in how the two sides' libraries count a window update in flight.
WINDOW_SLACK_BYTES = 256 * 1024


class WindowedBuffer(bytearray):
    """One stream's receive buffer (the library's ``stream_buffers`` value), which the connection's
    reader extends before it counts the bytes against ``recv_window``."""

    def __init__(self, conn: Any, stream_id: int):
        super().__init__()
        self.conn, self.stream_id = conn, stream_id
        self.over = 0  # bytes past the window so far

    def extend(self, data: Any) -> None:
        stream = self.conn.streams.get(self.stream_id)
        if stream is not None and len(data) > stream.recv_window:
            self.over += len(data) - max(stream.recv_window, 0)
            if self.over > WINDOW_SLACK_BYTES:
                self.conn.exceeded_window(self.stream_id, self.over)
                return  # dropped: the connection closes once its reader returns
        super().extend(data)


class WindowedBuffers(dict):
    """The connection's ``stream_buffers``: every buffer the library creates becomes a ``WindowedBuffer``."""

    def __init__(self, conn: Any, buffers: dict[int, bytearray]):
        super().__init__()
        self.conn = conn
        for stream_id, buffer in buffers.items():
            self[stream_id] = buffer

    def __setitem__(self, stream_id: int, buffer: bytearray) -> None:
        if not isinstance(buffer, WindowedBuffer):
            windowed = WindowedBuffer(self.conn, stream_id)
            bytearray.extend(windowed, buffer)  # bytes the library already holds (none for a new stream)
            buffer = windowed
        super().__setitem__(stream_id, buffer)
