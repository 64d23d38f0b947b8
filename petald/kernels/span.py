"""A contiguous span of transformer blocks: what one server holds and runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from petald.kernels.adapters.lora import AdapterError, LoraAdapter, load_lora_adapter
from petald.kernels.block import TransformerBlock
from petald.kernels.deep_prompts import check_deep_prompts
from petald.kernels.paged_kv_cache import DEFAULT_PAGE_SIZE, PagedKVCache, SessionCache
from petald.kernels.quant import check_quant
from petald.kernels.rotary import RotaryTable
from petald.kernels.sources.model_source import ModelSource
from petald.kernels.step_batch import Segment, StepBatch


class BlockSpan:
    """Blocks [start, end) of a model, loaded from ``source`` (and nothing else of it)."""

    def __init__(self, source: ModelSource, start: int, end: int, dtype: torch.dtype,
                 device: torch.device, progress: Callable[[int, int], None] | None = None, quant: str = "none"):
        total = source.config.num_hidden_layers
        if not 0 <= start < end <= total:
            raise ValueError(f"blocks {start}:{end} are not a span of this model's {total} blocks")
        self.config = source.config
        self.start, self.end = start, end
        check_quant(quant, device)
        self.dtype, self.device, self.quant = dtype, device, quant
        self.blocks: list[TransformerBlock] = []
        for i in range(start, end):
            self.blocks.append(TransformerBlock(source.block_tensors(i), self.config, i, dtype, device, quant))
            if progress is not None:
                progress(i - start + 1, end - start)
        self.rotary = RotaryTable(self.config, dtype, device)
        first = self.blocks[0]
        self.n_kv_heads, self.head_dim = first.n_kv_heads, first.head_dim
        self.hidden_size = self.config.hidden_size
        self.adapters: dict[str, LoraAdapter] = {}

    def add_adapter(self, adapter: LoraAdapter) -> None:
        """Let sessions run with ``adapter`` (by its name); it must have been loaded for this span."""
        if adapter.name in self.adapters:
            raise AdapterError(f"this span already holds an adapter named {adapter.name!r} "
                               f"(from {self.adapters[adapter.name].path}); give {adapter.path} another name")
        if not (adapter.start <= self.start and self.end <= adapter.end):
            raise AdapterError(f"adapter {adapter.name!r} was loaded for blocks {adapter.start}:{adapter.end}, "
                               f"which do not cover this span's {self.start}:{self.end}")
        if (adapter.dtype, torch.device(adapter.device)) != (self.dtype, torch.device(self.device)):
            raise AdapterError(f"adapter {adapter.name!r} was loaded as {adapter.dtype} on {adapter.device}; "
                               f"this span computes in {self.dtype} on {self.device}")
        self.adapters[adapter.name] = adapter

    def load_adapter(self, path: str | Path, name: str | None = None) -> LoraAdapter:
        """Load the PEFT LoRA adapter directory ``path`` for this span's blocks and add it."""
        adapter = load_lora_adapter(path, self.config, self.start, self.end, self.dtype, self.device, name)
        self.add_adapter(adapter)
        return adapter

    def adapter_named(self, name: str | None) -> LoraAdapter | None:
        """The adapter called ``name``; None or "" (the wire's "no adapter") is the base model alone."""
        if not name:
            return None
        try:
            return self.adapters[name]
        except KeyError:
            held = ", ".join(sorted(self.adapters)) or "none"
            raise AdapterError(f"this server holds no adapter named {name!r} (it holds: {held})") from None

    @property
    def max_positions(self) -> int:
        return self.rotary.max_positions

    def new_pool(self, cache_tokens: int, page_size: int = DEFAULT_PAGE_SIZE) -> PagedKVCache:
        """A KV pool for this span holding ``cache_tokens`` tokens summed over its blocks."""
        return PagedKVCache.from_budget(cache_tokens, self.end - self.start, page_size, self.n_kv_heads,
                                        self.head_dim, self.dtype, self.device)

    def new_cache(self, batch: int, max_length: int) -> SessionCache:
        """A session in a pool of its own, just big enough: for running a span in one process."""
        pool = self.new_pool(PagedKVCache.pages_for_tokens(batch, max_length, DEFAULT_PAGE_SIZE)
                             * DEFAULT_PAGE_SIZE * (self.end - self.start))
        return pool.open(batch, max_length)

    def forward(self, hidden: torch.Tensor, cache: SessionCache, start: int | None = None,
                end: int | None = None, adapter: str | None = None) -> torch.Tensor:
        """Run one session's ``hidden`` [B, T, H] through blocks [start, end) (default: the whole span).

        The tokens take positions [cache.length, cache.length + T); the cache advances by T.
        ``adapter`` names one of ``self.adapters`` to apply (None: the base model alone).
        """
        return self.forward_batch([(hidden, cache)], start, end, adapter=adapter)[0]

    @torch.inference_mode()
    def forward_batch(self, steps: list[tuple[torch.Tensor, SessionCache]], start: int | None = None,
                      end: int | None = None, prompts: list[torch.Tensor | None] | None = None,
                      adapter: str | None = None) -> list[torch.Tensor]:
        """Run the steps of several sessions (one step each, all in one pool) as one batched forward.

        ``prompts[i]`` (deep prompts of step i, [end - start, 1 or batch, n, hidden], or None) is added to
        the first n tokens of step i before each block. All steps run with the same LoRA ``adapter`` (or
        none): the executor never mixes adapters in a batch.
        """
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks {start}:{end} are outside this span {self.start}:{self.end}")
        lora = self.adapter_named(adapter)
        pool = steps[0][1].pool
        if pool.num_blocks != self.end - self.start:
            raise ValueError("the cache belongs to a pool of another span")
        segments, rows = [], []
        for hidden, cache in steps:
            if cache.pool is not pool:
                raise ValueError("steps of one batch must share one pool")
            if hidden.dim() != 3 or hidden.shape[0] != cache.batch:
                raise ValueError(f"hidden has shape {list(hidden.shape)}; expected [{cache.batch}, tokens, hidden]")
            pool.grow(cache, cache.length + hidden.shape[1])
            for row in range(cache.batch):
                segments.append(Segment(cache, row, cache.length, hidden.shape[1]))
                rows.append(hidden[row])
        batch = StepBatch(segments, pool, self.rotary, self.device)
        x = (rows[0] if len(rows) == 1 else torch.cat(rows)).to(device=self.device, dtype=self.dtype)
        added = self._prompt_rows(steps, prompts, end - start) if prompts is not None else None
        for layer in range(start - self.start, end - self.start):
            if added is not None:
                x = x.index_add(0, added[0], added[1][layer - (start - self.start)])
            block_lora = None if lora is None else lora.block(self.start + layer)
            x = self.blocks[layer].forward(x, batch, pool.keys[layer], pool.values[layer], block_lora)
        outputs = []
        for out, (hidden, cache) in zip(x.split([h.shape[0] * h.shape[1] for h, _ in steps]), steps, strict=True):
            outputs.append(out.view(hidden.shape[0], hidden.shape[1], -1))
            cache.length += hidden.shape[1]
        return outputs

    def _prompt_rows(self, steps: list[tuple[torch.Tensor, SessionCache]], prompts: list[torch.Tensor | None],
                     blocks: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The flattened rows that deep prompts touch, and what each block adds there: [R], [blocks, R, hidden]."""
        rows, addends = [], []
        offset = 0
        for (hidden, _), prompt in zip(steps, prompts, strict=True):
            batch, tokens = hidden.shape[0], hidden.shape[1]
            if prompt is not None:
                check_deep_prompts(prompt, blocks, batch, self.hidden_size, tokens)
                n = prompt.shape[2]
                rows.append((offset + torch.arange(batch)[:, None] * tokens + torch.arange(n)[None]).reshape(-1))
                addends.append(prompt.expand(blocks, batch, n, self.hidden_size).reshape(blocks, batch * n, -1))
            offset += batch * tokens
        if not rows:
            return None
        return (torch.cat(rows).to(self.device),
                torch.cat(addends, dim=1).to(device=self.device, dtype=self.dtype))
