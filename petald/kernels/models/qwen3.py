"""Qwen3: Llama's block with each query and key head RMS-normed before rotary; biases on q, k and v
only where ``attention_bias`` asks; sliding windows only on the layers its ``layer_types`` names;
GGUF keeps Hugging Face's row order."""

from petald.kernels.models.family import ModelFamily

FAMILY = ModelFamily(
    architecture="qwen3",
    window_on_every_layer=False,
    gguf_rotary_permuted=False,
    qkv_bias=lambda config: bool(getattr(config, "attention_bias", False)),
    qk_norm=True,
)
