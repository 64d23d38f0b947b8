"""The correctness oracle: transformers' own model on the same weights."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from petald.kernels.sources.open_source import default_gguf_path


@lru_cache(maxsize=4)
def reference_model(model_dir: str | None = None):
    if model_dir is None:
        path = default_gguf_path()
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(Path(model_dir)), dtype=torch.float32).eval()


@torch.no_grad()
def reference_greedy(model_dir: str | None, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """transformers' model with its own KV cache, argmax at every step, never stopping at EOS."""
    model = reference_model(model_dir)
    out = model(input_ids, use_cache=True)
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(int(nxt[0]))
        out = model(nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
    return tokens


@torch.no_grad()
def reference_logits(model_dir: str | None, input_ids: torch.Tensor) -> torch.Tensor:
    return reference_model(model_dir)(input_ids).logits
