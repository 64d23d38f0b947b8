"""Mixtral: Mistral's block (a sliding window on every layer where the config gives one) with a
mixture of experts for its MLP: a router picks ``num_experts_per_tok`` of ``num_local_experts``
SiLU-gated MLPs per token and mixes their outputs by its renormalized softmax weights
(``kernels/moe.py``). Its GGUF files (experts stacked as ``ffn_*_exps``) are refused for now."""

from petald.kernels.models.family import ExpertLayout, ModelFamily

FAMILY = ModelFamily(
    architecture="mixtral",
    window_on_every_layer=True,
    gguf_rotary_permuted=True,
    qkv_bias=lambda config: False,
    gate_up_projections=(),
    experts=ExpertLayout(),
    gguf_supported=False,
)
