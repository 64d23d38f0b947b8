"""Phi-3: Llama's block with q/k/v stored as one fused projection and gate/up as another (gate's rows
first), a sliding window on every layer where the config gives one, and no q/k/v biases. GGUF keeps
Hugging Face's row order and names the fused gate/up ``ffn_up``.

Its rope scalings: none (the 4k models) or longrope (the 128k ones; "su" and "yarn" in older configs
are read as longrope by transformers), served up to the original length (``kernels/rotary.py``);
a partial rotary embedding (Phi-4-mini) is refused (``models/features.py``).
"""

from petald.kernels.models.family import ModelFamily

FAMILY = ModelFamily(
    architecture="phi3",
    window_on_every_layer=True,
    gguf_rotary_permuted=False,
    qkv_bias=lambda config: False,
    qkv_projections=("self_attn.qkv_proj",),
    gate_up_projections=("mlp.gate_up_proj",),
    gguf_block_names=(("attn_qkv.weight", "self_attn.qkv_proj.weight"), ("ffn_up.weight", "mlp.gate_up_proj.weight")),
)
