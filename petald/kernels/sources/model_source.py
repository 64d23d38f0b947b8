"""What every model source gives: a config, a fingerprint, and tensors on demand.

A server asks only for the tensors of its own blocks, a client only for the
embeddings, final norm and LM head, so a source never materialises a whole model.
Tensor names are Hugging Face's, relative to their block (``self_attn.q_proj.weight``)
or to the model (``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PretrainedConfig

from petald.kernels.models.features import UnsupportedFeature, check_features
from petald.kernels.models.registry import UnsupportedArchitecture


class ModelSourceError(Exception):
    """A model cannot be opened or is not supported; the message says why."""


@dataclass(frozen=True)
class ModelIdentity:
    """Names a model and pins its exact weights."""

    name: str
    fingerprint: str  # hex digest over every tensor's name, type, shape and bytes
    num_blocks: int

    @property
    def model_id(self) -> str:
        slug = re.sub(r"[^a-z0-9.]+", "-", self.name.lower()).strip("-") or "model"
        return f"{slug}@{self.fingerprint[:12]}"


class ModelSource(Protocol):
    config: PretrainedConfig
    identity: ModelIdentity

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """The float tensors of block ``index``, dequantized."""
        ...

    def client_tensors(self) -> dict[str, torch.Tensor]:
        """``embed_tokens.weight``, ``norm.weight`` and ``lm_head.weight`` (tied if absent), and the
        family's others (``ModelFamily.client_tensors``: the norms' biases, BLOOM's ``embed_norm.*``)."""
        ...

    def load_tokenizer(self) -> Any:
        """A transformers tokenizer, or raise ModelSourceError if the source has none."""
        ...


def check_supported(config: PretrainedConfig, origin: str) -> None:
    """Refuse (ModelSourceError, naming ``origin``) a model of a family petald does not serve, or one
    that asks for a feature petald does not implement (``kernels/models/features.py``)."""
    try:
        check_features(config)
    except (UnsupportedArchitecture, UnsupportedFeature) as exc:
        raise ModelSourceError(f"{origin}: {exc}") from None
