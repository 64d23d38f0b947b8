"""Llama (and SmolLM2, the default model): the family the others are told apart from.

Biases on q, k and v only where the config's ``attention_bias`` asks; no sliding window.
"""

from petald.kernels.models.family import ModelFamily

FAMILY = ModelFamily(
    architecture="llama",
    window_on_every_layer=False,
    gguf_rotary_permuted=True,
    qkv_bias=lambda config: bool(getattr(config, "attention_bias", False)),
)
