"""Frames: a 4-byte big-endian length, then that many bytes of one msgpack map.

Sans-I/O: ``FrameDecoder`` takes bytes as they arrive and hands out whole
messages, so the network layer only moves bytes.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from petald.protocol.errors import ErrorCode, ProtocolError
from petald.protocol.limits import (
    FRAME_HEADER_BYTES,
    MAX_ARRAY_LEN,
    MAX_FRAME_BYTES,
    MAX_MAP_LEN,
    MAX_STRING,
)

_HEADER = struct.Struct(">I")


def encode_frame(message: dict[str, Any], max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > max_frame_bytes:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE,
                            f"frame of {len(body)} bytes exceeds the limit of {max_frame_bytes}")
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        # Tight container limits: without them a 32 MiB frame of empty maps becomes
        # ~30 million Python objects (gigabytes) before any field is checked.
        message = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                                  max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN, max_ext_len=0,
                                  max_str_len=MAX_STRING, max_bin_len=MAX_FRAME_BYTES)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame is not valid msgpack: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame is not a msgpack map with a string 'type'")
    return message


class FrameDecoder:
    """Accumulates bytes; ``next_message`` returns a message once a whole frame is in."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES):
        self.max_frame_bytes = max_frame_bytes  # may be raised after a small first frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def wanted(self) -> int:
        """How many more bytes complete the current frame (at least 1)."""
        if len(self._buffer) < FRAME_HEADER_BYTES:
            return FRAME_HEADER_BYTES - len(self._buffer)
        (length,) = _HEADER.unpack_from(self._buffer)
        self._check_length(length)
        return max(1, FRAME_HEADER_BYTES + length - len(self._buffer))

    def _check_length(self, length: int) -> None:
        if length > self.max_frame_bytes:
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE,
                                f"frame announces {length} bytes; the limit is {self.max_frame_bytes}")

    def next_message(self) -> dict[str, Any] | None:
        if len(self._buffer) < FRAME_HEADER_BYTES:
            return None
        (length,) = _HEADER.unpack_from(self._buffer)
        self._check_length(length)
        end = FRAME_HEADER_BYTES + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[FRAME_HEADER_BYTES:end])
        del self._buffer[:end]
        return decode_body(body)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def discard(self) -> None:
        """Drop the bytes of an unfinished frame (nobody will read the rest)."""
        self._buffer = bytearray()
