"""Qwen2: Llama's block with biases on q, k and v; sliding windows only on the layers its config's
``layer_types`` names (none unless ``use_sliding_window``); GGUF keeps Hugging Face's row order."""

from petald.kernels.models.family import ModelFamily

FAMILY = ModelFamily(
    architecture="qwen2",
    window_on_every_layer=False,
    gguf_rotary_permuted=False,
    qkv_bias=lambda config: True,
)
