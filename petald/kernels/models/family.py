"""What a model family is, as the rest of ``kernels/`` reads it.

Every family petald serves is a Llama-shaped decoder (RMS norms, rotary attention with grouped
key/value heads, a gated MLP); a family names only how it departs from Llama, each departure a field
here with Llama's value as its default: sliding windows, biases, q/k norms (Qwen3), projections
stored fused (Phi-3), extra norms, scaled embeddings and soft-capping (Gemma 2), a mixture of experts
(Mixtral).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig


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
    # The config key naming the MLP's activation (``models/features.py``'s ACTIVATIONS).
    activation_key: str = "hidden_act"

    def sliding_window(self, config: PretrainedConfig, index: int) -> int | None:
        """How many of the latest keys block ``index`` attends to, or None for all of them."""
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:  # the config says it layer by layer (transformers' Qwen2)
            return window if layer_types[index] == "sliding_attention" else None
        return window if self.window_on_every_layer else None
