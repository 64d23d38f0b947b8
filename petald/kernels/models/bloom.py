"""BLOOM: Llama's sequential block with LayerNorms (with biases) for its norms, an ungated MLP of width
4 x hidden with BLOOM's tanh-approximated gelu, biases on every projection, q/k/v fused into one
``query_key_value`` with each head's q, k and v rows in turn (brought to petald's q | k | v order at load),
and ALiBi instead of rotary: each head adds ``slope * key_position`` to its scores (``kernels/alibi.py``),
in the paged attention and in training; its decode steps never take the C kernel, which adds no bias.

Its embeddings are LayerNormed before the first block (``word_embeddings_layernorm``): by the client,
which holds them. Tensors live under ``transformer.h.N.`` (or ``h.N.``, as BLOOM's own checkpoints,
saved from the base model, store them: ``sources/hf_source.py``). ALiBi has no position limit; petald
serves BLOOM's training length, 2048. ``apply_residual_connection_post_layernorm`` (residuals taken after
the norms, which no released BLOOM sets) is refused, as are its GGUF files for now.
"""

import torch
from transformers import PretrainedConfig

from petald.kernels.models.family import MEGATRON_CLIENT_TENSORS, MEGATRON_LAYOUT, ModelFamily


def _qkv_row_order(config: PretrainedConfig) -> torch.Tensor:
    heads = config.num_attention_heads
    rows = torch.arange(3 * config.hidden_size).view(heads, 3, config.hidden_size // heads)  # q, k, v of each head
    return rows.transpose(0, 1).reshape(-1)


def _refusals(config: PretrainedConfig) -> list[str]:
    if config.apply_residual_connection_post_layernorm:
        return ["apply_residual_connection_post_layernorm (residuals after the norms) is not supported"]
    return []


FAMILY = ModelFamily(
    architecture="bloom",
    **(MEGATRON_LAYOUT | dict(client_tensors=MEGATRON_CLIENT_TENSORS + (
        ("transformer.word_embeddings_layernorm.weight", "embed_norm.weight"),
        ("transformer.word_embeddings_layernorm.bias", "embed_norm.bias")))),
    window_on_every_layer=False,
    gguf_rotary_permuted=False,
    qkv_bias=lambda config: True,
    gguf_supported=False,
    # BLOOM's config names no activation; its gelu (0.79788456 for sqrt(2 / pi)) is torch's tanh approximation
    # to float32's precision.
    default_activation="gelu_pytorch_tanh",
    linear_bias=lambda config: True,
    qkv_row_order=_qkv_row_order,
    # Every head its own key and value head; the MLP 4 x hidden wide (BLOOM's configs name neither).
    kv_heads_of=lambda config: config.num_attention_heads,
    intermediate_of=lambda config: 4 * config.hidden_size,
    alibi=True,
    default_positions=2048,
    refusals=_refusals,
)
