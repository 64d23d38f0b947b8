"""A block's dimensions, read from a model's config in one place."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def of(cls, config: PretrainedConfig) -> ModelDims:
        from petald.kernels.models.registry import family_of  # the families import this module

        family = family_of(config)
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            heads=heads,
            # Configs from before grouped-query attention name no key/value heads: one per query head.
            kv_heads=family.kv_heads_of(config) if family.kv_heads_of is not None else
            getattr(config, "num_key_value_heads", None) or heads,
            # An explicit head size (Qwen3-style configs) need not be hidden / heads.
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=family.intermediate_of(config) if family.intermediate_of is not None else
            config.intermediate_size,
        )

    @property
    def q_size(self) -> int:
        """Width of all query heads together."""
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of all key (or all value) heads together."""
        return self.kv_heads * self.head_dim
