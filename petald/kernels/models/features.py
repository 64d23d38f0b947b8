"""The config features petald implements, and the refusal, by name, of those it does not.

A model is checked once, when its source is opened (client and server alike), so that a feature
petald would otherwise serve wrongly (an unknown rope scaling, a partial rotary embedding, an
activation it does not compute) fails at once with a sentence, never as wrong tokens later.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from petald.kernels.models.registry import family_of

# Rope scalings whose frequencies are fixed for all positions (``kernels/rotary.py``); "longrope" up to
# its original_max_position_embeddings only, where it uses its short factors whatever the length.
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")

# The MLP activations by the name configs give them (transformers' ACT2FN names).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class UnsupportedFeature(ValueError):
    """A config of a family petald serves, asking for something petald does not implement."""


def rope_parameters(config: PretrainedConfig) -> dict:
    """The config's rope parameters (transformers' standardized ``rope_parameters``), {} if it has none."""
    return dict(getattr(config, "rope_parameters", None) or {})


def served_positions(config: PretrainedConfig) -> int:
    """How many positions petald serves for ``config``: its max_position_embeddings, except longrope's,
    which turns to its long factors past original_max_position_embeddings for new tokens only while the
    keys cached before keep their short-factor rotation, which a cache of rotated keys cannot follow."""
    positions = int(getattr(config, "max_position_embeddings", None) or family_of(config).default_positions)
    rope = rope_parameters(config)
    if rope.get("rope_type") == "longrope":
        original = rope.get("original_max_position_embeddings", getattr(config, "original_max_position_embeddings", None))
        positions = min(positions, int(original or positions))
    return positions


def activation_name(config: PretrainedConfig) -> str:
    """The MLP activation's name as the family's config spells its key."""
    family = family_of(config)
    return str(getattr(config, family.activation_key, None) or family.default_activation)


def unsupported_features(config: PretrainedConfig) -> list[str]:
    """What ``config`` asks for that petald does not implement, each in words; [] if nothing."""
    problems = list(family_of(config).refusals(config))
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        problems.append(f"rope scaling type {rope_type!r} is not supported (petald implements {', '.join(ROPE_TYPES)})")
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        problems.append(f"a partial rotary embedding (partial_rotary_factor {partial}) is not supported")
    activation = activation_name(config)
    if activation not in ACTIVATIONS:
        problems.append(f"the activation {activation!r} is not supported (petald implements "
                        f"{', '.join(ACTIVATIONS)})")
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", "?")
        problems.append(f"pre-quantized weights (quantization_config: {method}) are not supported; "
                        "use the unquantized model and petald's --quant")
    return problems


def check_features(config: PretrainedConfig) -> None:
    """Raise UnsupportedArchitecture or UnsupportedFeature (naming each problem) unless petald serves
    ``config`` as it is."""
    problems = unsupported_features(config)
    if problems:
        raise UnsupportedFeature(f"this {config.model_type} model cannot be served: {'; '.join(problems)}")
