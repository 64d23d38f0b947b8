"""Paged KV cache: one pool of fixed-size pages per server, a page table per session.

Each block of the span has a key pool and a value pool of shape
[num_pages * page_size + 1, kv_heads, head_dim] ("slots"; the last one is a
zero slot that padded attention reads). A page id names the same
``page_size`` slots in every block, so a session's page table is one list of
page ids per batch row, shared by all its blocks.

Admission reserves, at ``open``, the pages a session needs to reach its
``max_length`` (``batch * ceil(max_length / page_size)``), so a session never
fails mid-generation for lack of pages; the pages themselves are taken from the
free list lazily as the session grows. Only the executor thread takes pages
(``grow``); ``open`` and ``close`` may run on any thread. A closed session's
pages go back at once: a step of it still in flight may write into them, but no
other session can own them before the executor's next ``grow``.

Each session also keeps its slot indices as a tensor (``slot_table``, one row per
batch row, the pool's zero slot where no page is taken yet), filled in as pages are
taken: a step reads its slots as a view of it instead of rebuilding them from the
page table every step (that rebuild was most of a lone decode step's fixed cost).

A session may be rolled back (``truncate``): the client verified drafted tokens and kept fewer
than it sent (speculative decoding). Positions past the new length are forgotten, and the pages
wholly past it go back to the free list; the session's reservation stays, so it can grow again.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

DEFAULT_PAGE_SIZE = 16


class CacheFullError(Exception):
    """The server cannot hold another session of this size right now."""


@dataclass
class SessionCache:
    """One session's place in a pool: its page table and how far it has got."""

    pool: PagedKVCache
    batch: int
    max_length: int
    reserved_pages: int
    pages: list[list[int]] = field(default_factory=list)  # per batch row, page ids in position order
    # [batch, max_length rounded up to pages]: slot of each position, pad_slot until its page is taken.
    slot_table: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0, dtype=torch.long))
    length: int = 0  # positions filled so far
    closed: bool = False


class PagedKVCache:
    def __init__(self, num_blocks: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"a KV pool needs at least one page of at least one token (got {num_pages} x {page_size})")
        self.num_blocks, self.num_pages, self.page_size = num_blocks, num_pages, page_size
        self.device = device
        # One slot past the pages, kept at zero: padded attention reads it for the keys a row
        # does not have (masked out). Masking alone is not enough: a never-written slot holds
        # whatever the allocator left there, NaN included, and 0 * NaN is NaN.
        self.pad_slot = num_pages * page_size
        shape = (num_pages * page_size + 1, kv_heads, head_dim)
        # torch.empty: on CPU the OS commits memory only for pages that get written.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_blocks)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_blocks)]
        for pool in (*self.keys, *self.values):
            pool[self.pad_slot].zero_()
        self._page_offsets = torch.arange(page_size)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low page ids first
        self._reserved = 0
        self._lock = threading.Lock()

    @classmethod
    def from_budget(cls, cache_tokens: int, num_blocks: int, page_size: int, kv_heads: int, head_dim: int,
                    dtype: torch.dtype, device: torch.device) -> PagedKVCache:
        """A pool holding ``cache_tokens`` tokens summed over blocks (rounded down to whole pages)."""
        num_pages = cache_tokens // (page_size * num_blocks)
        if num_pages < 1:
            raise ValueError(f"--cache-tokens {cache_tokens} is less than one page ({page_size} tokens) "
                             f"in each of {num_blocks} blocks")
        return cls(num_blocks, num_pages, page_size, kv_heads, head_dim, dtype, device)

    @staticmethod
    def pages_for_tokens(batch: int, max_length: int, page_size: int) -> int:
        return batch * -(-max_length // page_size)

    @property
    def capacity_tokens(self) -> int:
        """The whole pool, in tokens summed over blocks."""
        return self.num_pages * self.page_size * self.num_blocks

    @property
    def free_tokens(self) -> int:
        """What admission can still grant, in tokens summed over blocks."""
        return (self.num_pages - self._reserved) * self.page_size * self.num_blocks

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token position takes in one batch row across all blocks."""
        k = self.keys[0]
        return 2 * self.num_blocks * k.shape[1] * k.shape[2] * k.element_size()

    def open(self, batch: int, max_length: int) -> SessionCache:
        need = self.pages_for_tokens(batch, max_length, self.page_size)
        with self._lock:
            if need > self.num_pages - self._reserved:
                free = (self.num_pages - self._reserved) * self.page_size * self.num_blocks
                raise CacheFullError(
                    f"KV cache full: batch {batch} x max_length {max_length} needs {need} pages of "
                    f"{self.page_size} tokens ({need * self.page_size * self.num_blocks} tokens over "
                    f"{self.num_blocks} blocks), {free} of {self.capacity_tokens} free; ask for a smaller "
                    "max_length or try another server")
            self._reserved += need
        slot_table = torch.full((batch, need // batch * self.page_size), self.pad_slot, dtype=torch.long)
        return SessionCache(self, batch, max_length, need, [[] for _ in range(batch)], slot_table)

    def close(self, session: SessionCache) -> None:
        """Return a session's pages and reservation; closing twice is harmless."""
        with self._lock:
            if session.closed:
                return
            session.closed = True
            for row in session.pages:
                self._free.extend(reversed(row))
                row.clear()
            self._reserved -= session.reserved_pages

    @contextlib.contextmanager
    def _holding(self, session: SessionCache) -> Iterator[None]:
        """The pool's lock, taken for a session that must still be open."""
        with self._lock:
            if session.closed:
                raise ValueError("the session is closed")
            yield

    def grow(self, session: SessionCache, length: int) -> None:
        """Give every row of ``session`` pages up to position ``length`` (executor thread only)."""
        if length > session.max_length:
            raise ValueError(f"step would reach position {length}, beyond max_length {session.max_length}")
        need = -(-length // self.page_size)
        with self._holding(session):
            for row, pages in enumerate(session.pages):
                while len(pages) < need:
                    page = self._free.pop()  # cannot run dry: open reserved up to max_length
                    first = len(pages) * self.page_size
                    session.slot_table[row, first : first + self.page_size] = page * self.page_size + self._page_offsets
                    pages.append(page)

    def truncate(self, session: SessionCache, length: int) -> None:
        """Forget positions [length, session.length): later steps overwrite them, and pages holding
        none of the first ``length`` positions go back to the free list. Never while a step of the
        session runs (its slots are read outside the lock)."""
        if not 0 <= length <= session.length:
            raise ValueError(f"cannot roll back to position {length}: the session holds {session.length}")
        keep = -(-length // self.page_size)
        with self._holding(session):
            for row, pages in enumerate(session.pages):
                if len(pages) > keep:
                    session.slot_table[row, keep * self.page_size :] = self.pad_slot
                    self._free.extend(reversed(pages[keep:]))
                    del pages[keep:]
            session.length = length

    def slots(self, session: SessionCache, row: int, start: int, end: int) -> torch.Tensor:
        """Flat slot indices of positions [start, end) of one batch row (a view: do not write into it)."""
        return session.slot_table[row, start:end]

    def slot(self, session: SessionCache, row: int, position: int) -> int:
        """The slot of one position (its page must have been taken)."""
        return session.pages[row][position // self.page_size] * self.page_size + position % self.page_size
