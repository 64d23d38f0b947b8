"""A contiguous span of transformer blocks: what one server holds and runs."""

from __future__ import annotations

from collections.abc import Callable

import torch

from petald.kernels.block import TransformerBlock
from petald.kernels.kv_cache import SessionKVCache
from petald.kernels.model_source import ModelSource
from petald.kernels.rotary import RotaryTable


class BlockSpan:
    """Blocks [start, end) of a model, loaded from ``source`` (and nothing else of it)."""

    def __init__(self, source: ModelSource, start: int, end: int, dtype: torch.dtype,
                 device: torch.device, progress: Callable[[int, int], None] | None = None):
        total = source.config.num_hidden_layers
        if not 0 <= start < end <= total:
            raise ValueError(f"blocks {start}:{end} are not a span of this model's {total} blocks")
        self.config = source.config
        self.start, self.end = start, end
        self.dtype, self.device = dtype, device
        self.blocks: list[TransformerBlock] = []
        for i in range(start, end):
            self.blocks.append(TransformerBlock(source.block_tensors(i), self.config, i, dtype, device))
            if progress is not None:
                progress(i - start + 1, end - start)
        self.rotary = RotaryTable(self.config, dtype, device)
        first = self.blocks[0]
        self.n_kv_heads, self.head_dim = first.n_kv_heads, first.head_dim
        self.hidden_size = self.config.hidden_size

    @property
    def max_positions(self) -> int:
        return self.rotary.max_positions

    def new_cache(self, batch: int, max_length: int, start: int | None = None,
                  end: int | None = None) -> SessionKVCache:
        start = self.start if start is None else start
        end = self.end if end is None else end
        return SessionKVCache.allocate(end - start, batch, max_length, self.n_kv_heads, self.head_dim,
                                       self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, cache: SessionKVCache, start: int | None = None,
                end: int | None = None) -> torch.Tensor:
        """Run ``hidden`` [B, T, H] through blocks [start, end) (default: the whole span).

        The tokens take positions [cache.length, cache.length + T); the cache advances by T.
        """
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks {start}:{end} are outside this span {self.start}:{self.end}")
        if len(cache.keys) != end - start:
            raise ValueError("cache was allocated for a different number of blocks")
        position, length = cache.length, hidden.shape[1]
        if position + length > cache.max_length:
            raise ValueError(f"step would reach position {position + length}, beyond max_length {cache.max_length}")
        cos, sin = self.rotary.at(position, length)
        x = hidden.to(device=self.device, dtype=self.dtype)
        masks: dict[int | None, torch.Tensor | None] = {}
        for slot, block in enumerate(self.blocks[start - self.start : end - self.start]):
            if block.window not in masks:
                masks[block.window] = block.attention_mask(position, length, self.device)
            x = block.forward(x, cos, sin, cache.keys[slot], cache.values[slot], position, masks[block.window])
        cache.length = position + length
        return x
