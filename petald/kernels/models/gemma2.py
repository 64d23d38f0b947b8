"""Gemma 2: Llama's block with a norm after attention and after the MLP as well as before each, every
norm scaling by 1 + its weight, embeddings scaled by sqrt(hidden), attention scores scaled by
query_pre_attn_scalar ** -0.5 and soft-capped, as are the final logits, a gelu-tanh MLP, and sliding
windows on the layers its ``layer_types`` names (every other one).

Soft-capped attention has no fused kernel (torch's scaled_dot_product_attention and petald's C decode
attention compute plain softmax attention): its blocks run ``kernels/softcap_attention.py``. Its GGUF
files are refused for now: llama.cpp's converter stores its norm weights as 1 + w and names its four
norms its own way, neither of which petald's GGUF reader knows yet.
"""

from petald.kernels.models.family import ModelFamily

FAMILY = ModelFamily(
    architecture="gemma2",
    window_on_every_layer=False,
    gguf_rotary_permuted=False,
    qkv_bias=lambda config: bool(getattr(config, "attention_bias", False)),
    block_norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
    norm_weight_offset=1.0,
    embedding_scale=lambda config: config.hidden_size ** 0.5,
    attention_scale=lambda config: config.query_pre_attn_scalar ** -0.5,
    attention_softcap=lambda config: getattr(config, "attn_logit_softcapping", None),
    final_softcap=lambda config: getattr(config, "final_logit_softcapping", None),
    gguf_supported=False,
    activation_key="hidden_activation",
)
