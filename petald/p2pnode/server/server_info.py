"""What a server says about a span of blocks it serves: its answer to an info request, and the
figures its DHT record carries (before the span is loaded, from the settings it will load with)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from petald import __version__
from petald.kernels.dtypes import dtype_name
from petald.kernels.sources.model_source import ModelIdentity
from petald.protocol.messages import ServerInfo


def span_info(identity: ModelIdentity, start: int, end: int, dtype: torch.dtype, quant: str, hidden_size: int,
              max_length: int, free_cache_tokens: int, adapters: Iterable[str],
              cache_capacity_tokens: int = 0) -> ServerInfo:
    """``adapters``: the names of the LoRA adapters served (as ``load_lora_adapter`` names them);
    ``cache_capacity_tokens``: the whole KV budget (0: not known yet)."""
    return ServerInfo(
        model_id=identity.model_id, fingerprint=identity.fingerprint, num_blocks=identity.num_blocks,
        start=start, end=end, dtype=dtype_name(dtype), quant=quant, hidden_size=hidden_size,
        max_length=max_length, free_cache_tokens=free_cache_tokens, version=__version__,
        adapters=sorted(adapters), cache_capacity_tokens=cache_capacity_tokens)
