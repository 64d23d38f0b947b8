"""The correctness oracle: transformers' own model on the same weights."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from petald.kernels.sources import default_gguf_path


@lru_cache(maxsize=4)
def reference_model(model_dir: str | None = None):
    if model_dir is None:
        path = default_gguf_path()
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(Path(model_dir)), dtype=torch.float32).eval()


@torch.no_grad()
def reference_greedy(model_dir: str | None, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    model = reference_model(model_dir)
    out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                         min_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, input_ids.shape[1]:].tolist()


@torch.no_grad()
def reference_logits(model_dir: str | None, input_ids: torch.Tensor) -> torch.Tensor:
    return reference_model(model_dir)(input_ids).logits
