"""A nursery whose first failure comes out as itself, not wrapped in an exception group.

trio wraps whatever a nursery's tasks (or its body) raise in an exception group. Callers of the
node's work catch specific errors (NoRouteError, ProtocolError, ServerUnavailable, ...), so a
nursery that stands for one piece of work re-raises the first failure alone: the first task to
fail cancels the others (as in any nursery), and what they raise while being cancelled is dropped.
Both roles use it: a client running a batch's chunks or a step beside its late copy, a server
running a session beside the reader of its stream. It is plain trio, nothing of libp2p: it lives in
transport/ because that is the one room both roles stand on (server/ and client/ may not import
each other).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio


@contextlib.asynccontextmanager
async def open_first_failure_nursery() -> AsyncIterator[trio.Nursery]:
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        first = group.exceptions[0]
        while isinstance(first, BaseExceptionGroup):  # a task's own nursery failed
            first = first.exceptions[0]
        raise first from None
