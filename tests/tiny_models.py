"""Tiny random models of every supported family, saved as Hugging Face directories."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = ("llama", "mistral", "qwen2")
TINY_BLOCKS = 6


def tiny_config(family: str):
    common = dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=TINY_BLOCKS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.1, tie_word_embeddings=False,
    )
    if family == "mistral":
        common["sliding_window"] = 24  # short enough that the tests cross it
    if family == "qwen2":
        common["tie_word_embeddings"] = True
    return AutoConfig.for_model(family, **common)


def save_tiny_model(family: str, path: Path, sharded: bool = False, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="60KB" if sharded else "2GB")
    return path
