"""Per-session KV cache and the server-wide token budget that admits sessions.

Today a session's cache is dense: one [batch, kv_heads, max_length, head_dim]
tensor pair per block, allocated when the session opens. The budget counts
tokens (batch * max_length * blocks), which is what a paged cache will count
too, so admission does not change when paging lands.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


class CacheFullError(Exception):
    """The server cannot hold another session of this size right now."""


class KVCacheBudget:
    """How many cache tokens (summed over blocks) a server may hand out."""

    def __init__(self, max_tokens: int):
        self.max_tokens = int(max_tokens)
        self._used = 0
        self._lock = threading.Lock()

    @property
    def free_tokens(self) -> int:
        return self.max_tokens - self._used

    def reserve(self, tokens: int) -> None:
        with self._lock:
            if tokens > self.max_tokens - self._used:
                raise CacheFullError(
                    f"KV cache full: asked for {tokens} tokens, {self.max_tokens - self._used} of "
                    f"{self.max_tokens} free; ask for a smaller max_length or try another server"
                )
            self._used += tokens

    def release(self, tokens: int) -> None:
        with self._lock:
            self._used = max(0, self._used - tokens)


@dataclass
class SessionKVCache:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    max_length: int
    length: int = 0  # positions filled so far

    @classmethod
    def allocate(cls, num_blocks: int, batch: int, max_length: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> SessionKVCache:
        shape = (batch, kv_heads, max_length, head_dim)
        return cls(
            keys=[torch.empty(shape, dtype=dtype, device=device) for _ in range(num_blocks)],
            values=[torch.empty(shape, dtype=dtype, device=device) for _ in range(num_blocks)],
            max_length=max_length,
        )

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0
