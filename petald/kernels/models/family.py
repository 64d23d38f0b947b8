"""What a model family is, as the rest of ``kernels/`` reads it.

Every family petald serves is a Llama-shaped decoder (RMS norms, rotary attention with grouped
key/value heads, a gated MLP); a family names only how it departs from Llama, each departure a field
here with Llama's value as its default: sliding windows, biases, q/k norms (Qwen3), projections
stored fused (Phi-3), extra norms, scaled embeddings and soft-capping (Gemma 2), a mixture of experts
(Mixtral), tensor names of its own, LayerNorms, an ungated MLP and a parallel residual (Falcon), ALiBi
and an embedding norm (BLOOM).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

# The model-level tensors a client holds, by Hugging Face's (Llama's) names, and the names petald gives them.
LLAMA_CLIENT_TENSORS = (("model.embed_tokens.weight", "embed_tokens.weight"), ("model.norm.weight", "norm.weight"),
                        ("lm_head.weight", "lm_head.weight"))

# What Falcon and BLOOM (both from Megatron-style code) share: tensor names under ``transformer.``, q/k/v
# fused as ``query_key_value``, an ungated MLP, LayerNorms with biases; ``ModelFamily(**MEGATRON_LAYOUT, ...)``.
MEGATRON_CLIENT_TENSORS = (("transformer.word_embeddings.weight", "embed_tokens.weight"),
                           ("transformer.ln_f.weight", "norm.weight"), ("transformer.ln_f.bias", "norm.bias"),
                           ("lm_head.weight", "lm_head.weight"))
MEGATRON_LAYOUT = dict(
    block_prefix="transformer.h.{index}.", client_tensors=MEGATRON_CLIENT_TENSORS,
    qkv_projections=("self_attention.query_key_value",), o_projection="self_attention.dense",
    gate_up_projections=("mlp.dense_h_to_4h",), down_projection="mlp.dense_4h_to_h", gated_mlp=False,
    layer_norm=True, norm_eps_key="layer_norm_epsilon",
)


@dataclass(frozen=True)
class ExpertLayout:
    """Where a mixture-of-experts MLP keeps its tensors (Mixtral's names by default): a router, and per
    expert a SiLU-gated MLP (``kernels/moe.py``)."""

    router: str = "block_sparse_moe.gate"
    expert: str = "block_sparse_moe.experts.{expert}"  # the expert's prefix, by its index
    gate: str = "w1"
    up: str = "w3"
    down: str = "w2"
    count_key: str = "num_local_experts"  # the config keys for how many experts, and how many a token takes
    top_k_key: str = "num_experts_per_tok"


@dataclass(frozen=True)
class ModelFamily:
    architecture: str  # config.model_type, which is also the GGUF's general.architecture
    # Whether the config's ``sliding_window`` applies to every layer where the config names no
    # per-layer ``layer_types`` (Mistral); otherwise layers without a type attend to all keys.
    window_on_every_layer: bool
    # Whether llama.cpp's converter interleaved each head's two rotary halves in the Q and K rows
    # of this family's GGUF files (it does for Llama and Mistral, not for Qwen2).
    gguf_rotary_permuted: bool
    # Whether the q, k and v projections of a block carry biases.
    qkv_bias: Callable[[PretrainedConfig], bool]
    # Whether each query and key head is RMS-normed (over head_dim, its own weights for q and for k)
    # between the projection and rotary (Qwen3).
    qk_norm: bool = False
    # The source tensors (by their Hugging Face names, ``.weight``/``.bias`` left off) that make the
    # block's fused q/k/v projection and its fused gate/up projection, in row order: Phi-3 stores
    # them fused already.
    qkv_projections: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    gate_up_projections: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    # GGUF block tensor names (after ``blk.N.``) that mean another Hugging Face tensor in this family
    # than in the others (``sources/gguf_source.py``): llama.cpp names Phi-3's fused gate/up ``ffn_up``.
    gguf_block_names: tuple[tuple[str, str], ...] = ()
    # A block's RMS norms by their tensor names: before attention, after it (on its output, before the
    # residual add), before the MLP and after it; None where the family has none (Gemma 2 has all four).
    block_norms: tuple[str, str | None, str, str | None] = (
        "input_layernorm", None, "post_attention_layernorm", None)
    # What every RMS norm's stored weight is added to before use: Gemma stores w for a scale of 1 + w.
    norm_weight_offset: float = 0.0
    # The factor token embeddings are multiplied by (in the embeddings' dtype), or None (Gemma: sqrt(hidden)).
    embedding_scale: Callable[[PretrainedConfig], float | None] = lambda config: None
    # The attention scores' scale where it is not head_dim ** -0.5 (Gemma 2: query_pre_attn_scalar ** -0.5).
    attention_scale: Callable[[PretrainedConfig], float | None] = lambda config: None
    # Logit soft-capping, cap * tanh(x / cap), of the attention scores and of the final logits; None: none.
    attention_softcap: Callable[[PretrainedConfig], float | None] = lambda config: None
    final_softcap: Callable[[PretrainedConfig], float | None] = lambda config: None
    # Where a mixture-of-experts family keeps its MLP's experts (Mixtral), or None for a dense MLP
    # (``gate_up_projections`` and ``mlp.down_proj``).
    experts: ExpertLayout | None = None
    # Whether petald reads this family's GGUF files (it does not know how llama.cpp converted them all).
    gguf_supported: bool = True
    # The config key naming the MLP's activation (``models/features.py``'s ACTIVATIONS), and the activation
    # where the config names none (BLOOM's is fixed: its tanh-approximated gelu).
    activation_key: str = "hidden_act"
    default_activation: str = "silu"
    # Where the source keeps a block's tensors (the prefix of their Hugging Face names, by block index), and
    # the model-level tensors a client holds (source name, petald's name: ``embed_tokens.weight``,
    # ``norm.weight``, ``lm_head.weight``, and ``embed_norm.weight`` where the family norms its embeddings).
    block_prefix: str = "model.layers.{index}."
    client_tensors: tuple[tuple[str, str], ...] = LLAMA_CLIENT_TENSORS
    # The attention's output projection and the MLP's last one.
    o_projection: str = "self_attn.o_proj"
    down_projection: str = "mlp.down_proj"
    # Whether the MLP is gated (act(gate) * up, ``gate_up_projections`` two modules or one fused); else
    # act(up) with ``gate_up_projections`` naming the one up projection (Falcon, BLOOM).
    gated_mlp: bool = True
    # LayerNorm (a weight and a bias; mean subtracted) instead of RMSNorm, and the config key of the norms' epsilon.
    layer_norm: bool = False
    norm_eps_key: str = "rms_norm_eps"
    # ``block_norms`` where the config decides them (Falcon: one shared norm or two); None: ``block_norms``.
    block_norms_of: Callable[[PretrainedConfig], tuple[str, str | None, str, str | None]] | None = None
    # Whether attention and the MLP both read the block's input (x + attn(x) + mlp(x): Falcon) rather than
    # the MLP reading attention's residual sum.
    parallel_residual: Callable[[PretrainedConfig], bool] = lambda config: False
    # Whether the output and MLP projections carry biases too (the memory plan counts them).
    linear_bias: Callable[[PretrainedConfig], bool] = lambda config: False
    # The permutation that brings a fused q/k/v projection's rows from the family's layout to petald's
    # (all query heads, all key heads, all value heads), or None where they are in that order already.
    qkv_row_order: Callable[[PretrainedConfig], torch.Tensor | None] = lambda config: None
    # Key/value heads and the MLP's width where the config does not say them as Llama's does.
    kv_heads_of: Callable[[PretrainedConfig], int] | None = None
    intermediate_of: Callable[[PretrainedConfig], int] | None = None
    # ALiBi (a per-head linear bias on the key positions) instead of rotary embeddings (BLOOM).
    alibi: bool = False
    # Positions served where the config names no max_position_embeddings (ALiBi's BLOOM: its training length).
    default_positions: int | None = None
    # What a config of this family asks for that petald does not implement, each in words (features.py).
    refusals: Callable[[PretrainedConfig], list[str]] = lambda config: []

    def norms(self, config: PretrainedConfig) -> tuple[str, str | None, str, str | None]:
        """The block's norms by tensor name (``block_norms``), as ``config`` decides them."""
        return self.block_norms if self.block_norms_of is None else self.block_norms_of(config)

    def sliding_window(self, config: PretrainedConfig, index: int) -> int | None:
        """How many of the latest keys block ``index`` attends to, or None for all of them."""
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:  # the config says it layer by layer (transformers' Qwen2)
            return window if layer_types[index] == "sliding_attention" else None
        return window if self.window_on_every_layer else None
