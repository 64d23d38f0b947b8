"""Falcon: parallel attention and MLP (x + attn(ln(x)) + mlp(ln'(x))), LayerNorms with biases, an ungated
GELU MLP, rotary attention, and q/k/v fused into one ``query_key_value`` whose row layout depends on the
generation, brought to petald's q | k | v order at load (``qkv_row_order``):

- the new decoder architecture (Falcon-40B/180B, ``new_decoder_architecture``): grouped key/value heads,
  each group's rows its query heads then its key then its value; two norms (``ln_attn``, ``ln_mlp``), or
  one (``input_layernorm``) where ``num_ln_in_parallel_attn`` is 1;
- the older one (Falcon-7B): multi-query (all query heads, then the one key and value head) with one
  shared norm, or, without ``multi_query``, heads interleaved (q, k, v of head 0, then of head 1, ...);
  ``parallel_attn`` false makes its block sequential, as Llama's.

Tensors live under ``transformer.h.N.``. Falcon-RW's ALiBi (``alibi``: its bias is scaled with the scores,
unlike BLOOM's) is refused, as are the new architecture without ``parallel_attn`` and the older one's
interleaved layout with fewer key heads than query heads, on which transformers' own layer fails. Its GGUF files are refused for now (llama.cpp names its tensors its own way).
"""

import torch
from transformers import PretrainedConfig

from petald.kernels.models.family import MEGATRON_LAYOUT, ModelFamily


def _kv_heads(config: PretrainedConfig) -> int:
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


def _qkv_row_order(config: PretrainedConfig) -> torch.Tensor | None:
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    if config.new_decoder_architecture:  # per key/value group: its query heads, its key, its value
        rows = torch.arange((heads + 2 * config.num_kv_heads) * head_dim).view(config.num_kv_heads, -1, head_dim)
        group = heads // config.num_kv_heads
        return torch.cat([rows[:, :group].reshape(-1), rows[:, group].reshape(-1), rows[:, group + 1].reshape(-1)])
    if config.multi_query:  # q heads, then k, then v already
        return None
    rows = torch.arange(3 * heads * head_dim).view(heads, 3, head_dim)  # q, k, v of each head in turn
    return rows.transpose(0, 1).reshape(-1)


def _block_norms(config: PretrainedConfig) -> tuple[str, None, str, None]:
    if config.new_decoder_architecture and (config.num_ln_in_parallel_attn or 2) == 2:
        return ("ln_attn", None, "ln_mlp", None)
    if config.new_decoder_architecture or config.parallel_attn:  # one norm both branches read
        return ("input_layernorm", None, "input_layernorm", None)
    return ("input_layernorm", None, "post_attention_layernorm", None)


def _refusals(config: PretrainedConfig) -> list[str]:
    problems = []
    if config.alibi:
        problems.append("Falcon with ALiBi (alibi: true, Falcon-RW) is not supported")
    if config.new_decoder_architecture and not config.parallel_attn:
        problems.append("the new decoder architecture without parallel_attn is not supported "
                        "(transformers' own Falcon layer cannot run it)")
    if not config.new_decoder_architecture and not config.multi_query and \
            config.num_kv_heads != config.num_attention_heads:
        problems.append(f"num_kv_heads {config.num_kv_heads} without multi_query or the new decoder architecture "
                        f"is not supported (its q/k/v layout has one key head per query head: "
                        f"{config.num_attention_heads})")
    return problems


FAMILY = ModelFamily(
    architecture="falcon",
    **MEGATRON_LAYOUT,
    window_on_every_layer=False,
    gguf_rotary_permuted=False,
    qkv_bias=lambda config: bool(config.bias),
    gguf_supported=False,
    activation_key="activation",
    default_activation="gelu",
    block_norms_of=_block_norms,
    parallel_residual=lambda config: bool(config.new_decoder_architecture or config.parallel_attn),
    linear_bias=lambda config: bool(config.bias),
    qkv_row_order=_qkv_row_order,
    kv_heads_of=_kv_heads,
    intermediate_of=lambda config: config.ffn_hidden_size,
    refusals=_refusals,
)
