"""Mistral: Llama's block, with every layer attending to the last ``sliding_window`` keys only."""

from petald.kernels.models.family import ModelFamily

FAMILY = ModelFamily(
    architecture="mistral",
    window_on_every_layer=True,
    gguf_rotary_permuted=True,
    qkv_bias=lambda config: False,
)
