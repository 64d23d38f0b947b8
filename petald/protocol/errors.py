"""Errors that cross the wire: a code a program can branch on and a message a person can read."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_FRAME = "bad_frame"  # not a length-prefixed msgpack map
    FRAME_TOO_LARGE = "frame_too_large"
    BAD_MESSAGE = "bad_message"  # a field missing, of the wrong type or out of range
    BAD_TENSOR = "bad_tensor"  # wrong dtype, shape, codec or byte count
    VERSION = "version"  # another wire version
    WRONG_MODEL = "wrong_model"  # the weights fingerprint differs
    SPAN_NOT_SERVED = "span_not_served"  # blocks this server does not hold
    UNKNOWN_ADAPTER = "unknown_adapter"  # a LoRA adapter this server does not hold
    CACHE_FULL = "cache_full"
    TOO_LARGE = "too_large"  # a request over this server's own limits (another server may take it)
    BUSY = "busy"  # no room for the request now (e.g. every training slot taken): retry or go elsewhere
    QUOTA = "quota"  # this peer holds its share of the server already (docs/security.md, "Per-peer limits")
    BAD_STATE = "bad_state"  # e.g. a step at a position the session is not at
    TIMEOUT = "timeout"  # the peer was silent, or a step or session ran, longer than the server allows
    SHUTTING_DOWN = "shutting_down"  # the server is leaving: go elsewhere
    NOT_MEMBER = "not_member"  # the peer is not on the private swarm owner's signed member list
    INTERNAL = "internal"


class ProtocolError(Exception):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class RemoteError(Exception):
    """A peer answered with an error frame."""

    def __init__(self, peer: str, code: str, message: str):
        super().__init__(f"server {peer} refused: {code}: {message}")
        self.peer, self.code, self.message = peer, code, message
