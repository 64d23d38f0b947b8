"""A node-wide budget for the bytes of frames received in part: what peers' unfinished frames hold.

One frame may be up to ``MAX_FRAME_BYTES`` (32 MiB), and a stream holds what has come of its
current frame until the rest arrives. Without a budget across streams, 16 sessions each sending
31 MiB of a 32 MiB frame made a server hold 509 MB (issue 22, hole 3). A frame counts whole from
the moment its header is in (``FramedStream``); a stream whose frame would take the bytes held past
the budget is refused with ``busy`` before its body comes: the peer may retry later or elsewhere.
"""

from __future__ import annotations

from petald.protocol.errors import ErrorCode, ProtocolError
from petald.protocol.limits import RECEIVING_FRAMES_BUDGET_BYTES


class FrameBudget:
    def __init__(self, limit: int = RECEIVING_FRAMES_BUDGET_BYTES):
        self.limit = limit
        self.held = 0  # bytes of unfinished frames, all streams

    def change(self, before: int, after: int) -> None:
        """A stream's unfinished frame goes from ``before`` to ``after`` bytes; growth past the
        budget raises ``busy`` (nothing is taken then)."""
        grow = after - before
        if grow > 0 and self.held + grow > self.limit:
            raise ProtocolError(ErrorCode.BUSY, f"this server is receiving {self.held >> 20} MiB of other "
                                                f"peers' frames, its limit; retry later or use another server")
        self.held += grow
