"""Frames over a libp2p stream: read whole messages, write whole messages, with timeouts."""

from __future__ import annotations

from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.io.exceptions import IOException

from petald.p2pnode.transport.frame_budget import FrameBudget
from petald.p2pnode.transport.libp2p_internals import prepare_framed_stream
from petald.protocol.framing import FrameDecoder, encode_frame
from petald.protocol.limits import MAX_FRAME_BYTES, transfer_seconds

_READ_CHUNK = 1 << 20
_MIN_READ = 64 * 1024  # read past the header in one go: fewer reads, fewer yamux window updates
# A close or reset is one frame each way; 20 round trips at 100 ms, so a peer that never
# answers costs 2 s, not the stream.
CLOSE_TIMEOUT_S = 2.0


class PeerGone(Exception):
    """The stream closed or broke while we waited on it."""


class FramedStream:
    def __init__(self, stream: INetStream, max_frame_bytes: int = MAX_FRAME_BYTES, send_timeout: float = 60.0):
        self.stream = stream
        self._direct = prepare_framed_stream(stream)  # None: not one of petald's own connections
        self.send_timeout = send_timeout  # a peer that stops reading must not hold us forever
        self._decoder = FrameDecoder(max_frame_bytes)
        # Bytes of frames through this stream, header included: what a session's wire choice costs.
        self.bytes_sent = self.bytes_received = 0
        self._budget: FrameBudget | None = None
        self._held = 0  # bytes of an unfinished frame counted in the budget

    def allow_frames_up_to(self, max_frame_bytes: int, budget: FrameBudget | None = None) -> None:
        """Raise the frame limit once the peer has earned it (e.g. after a valid session open); the
        bytes of its unfinished frames then count in ``budget`` (a full one refuses them: ``busy``)."""
        self._decoder.max_frame_bytes = max_frame_bytes
        self._budget = budget
        self._hold(self._decoder.buffered)

    def _hold(self, buffered: int) -> None:
        if self._budget is not None:
            self._budget.change(self._held, buffered)
            self._held = buffered

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None on a clean end of stream between frames.

        Raises ProtocolError for malformed or oversized frames, PeerGone for a broken stream.
        """
        while (msg := self._decoder.next_message()) is None:
            want = self._decoder.wanted()  # raises on an oversized header before reading the body
            # A frame's whole size counts once its header is in: one the budget cannot hold is
            # refused before its body comes, and one admitted is never refused halfway.
            self._hold(self._decoder.buffered + want)
            size = min(max(want, _MIN_READ), _READ_CHUNK)
            try:
                data = await self._direct.read(size) if self._direct is not None else None
                if data is None:  # not the common case: the library's read answers
                    data = await self.stream.read(size)
            except EOFError:
                data = b""
            except (IOException, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise PeerGone(f"stream broke: {exc or type(exc).__name__}") from None
            if not data:
                if self._decoder.buffered:
                    raise PeerGone("stream ended in the middle of a frame")
                return None
            self.bytes_received += len(data)
            self._decoder.feed(data)
        self._hold(self._decoder.buffered)
        return msg

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_frame(encode_frame(message))

    async def send_frame(self, frame: bytes) -> None:
        """Send a frame already made by ``encode_frame`` (a sender that must know it fits, first).

        The peer has ``send_timeout`` to take it, plus the frame's transfer time over the slowest
        link petald allows for (``limits.SLOWEST_LINK_BYTES_PER_S``)."""
        timeout = self.send_timeout + transfer_seconds(len(frame))
        try:
            with trio.fail_after(timeout):
                if self._direct is None or not await self._direct.write(frame):
                    await self.stream.write(frame)
            self.bytes_sent += len(frame)
        except trio.TooSlowError:
            raise PeerGone(f"peer did not take a {len(frame)}-byte frame within {timeout:.0f} s") from None
        except (IOException, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGone(f"stream broke while sending: {exc or type(exc).__name__}") from None

    async def close(self) -> None:
        """Close the stream; one whose peer is in the middle of a frame nobody will read (a session
        refused mid-step) has what comes of that frame dropped, then is reset (``_drop_rest``)."""
        if self._decoder.buffered:
            await self._drop_rest()
            return
        self._hold(0)
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await self.stream.close()
            except Exception:
                pass  # closing a broken stream has nothing left to release

    async def _drop_rest(self) -> None:
        """End a stream whose peer is sending a frame nobody will read: hold none of it, give the
        peer ``CLOSE_TIMEOUT_S`` to read what was sent to it (an error frame) and stop, then reset:
        a reset at once could lose the error frame, and one never would leave the peer sending."""
        self._decoder.discard()
        self._hold(0)
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await self.stream.close()
                while await self.stream.read(_READ_CHUNK):
                    pass  # dropped as it comes
            except Exception:
                pass  # the peer reset or broke the stream: nothing more will come
        await self.reset()

    async def reset(self) -> None:
        self._decoder.discard()
        self._hold(0)
        if self._direct is not None:
            self._direct.discard_unread()
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await self.stream.reset()
            except Exception:
                pass
