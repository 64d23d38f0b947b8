"""Tiny random models of every supported family, saved as Hugging Face directories."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TINY_BLOCKS = 6

# The tiny models the tests run, by name: the family (config model_type) and how the config departs
# from the common one, where the real models of that family or generation do.
TINY_MODELS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": 24}),  # short enough that the tests cross it
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    # Llama 3.x: llama3 rope scaling (an original length short enough that every frequency band
    # departs from plain rotary), a head size apart from hidden / heads, several end-of-sequence ids.
    "llama3": ("llama", {"head_dim": 32, "eos_token_id": [317, 318, 319], "rope_scaling": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    # Qwen3: q/k norms, a head size apart from hidden / heads, tied embeddings as its small models.
    "qwen3": ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
    # Phi-3: fused projections, a sliding window on every layer, and the 128k models' longrope
    # scaling, served up to its original length (64 here: the tests stay below it).
    "phi3": ("phi3", {"sliding_window": 24, "max_position_embeddings": 256, "original_max_position_embeddings": 64,
                      "pad_token_id": None, "eos_token_id": 2, "rope_scaling": {
                          "rope_type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)],
                          "long_factor": [2.0 + i for i in range(8)]}}),
    # Gemma 2: caps low enough that soft-capping changes the scores and logits of a tiny random model,
    # a score scale apart from head_dim ** -0.5, sliding windows of 8 on every other layer.
    "gemma2": ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 2.0,
                          "final_logit_softcapping": 3.0, "sliding_window": 8, "tie_word_embeddings": True}),
    # Mixtral: 4 experts, 2 a token, and a sliding window on every layer, as Mistral.
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 24}),
    # Falcon's new decoder architecture (Falcon-40B/180B): grouped key/value heads in its fused q/k/v
    # layout, two LayerNorms feeding parallel attention and MLP, an ungated gelu MLP; biases on, so that a
    # wrong row order in them shows (the real models have none: test_model_families checks that variant).
    "falcon": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2, "ffn_hidden_size": 128,
                          "bias": True}),
    # BLOOM: ALiBi (4 heads: slopes 1/4 to 1/256), an embedding LayerNorm, tied embeddings as its models.
    "bloom": ("bloom", {"tie_word_embeddings": True}),
}
# Every architecture the tiny models cover.
FAMILIES = tuple(sorted({family for family, _ in TINY_MODELS.values()}))


def tiny_config(name: str, **overrides):
    """The config of tiny model ``name`` (or of a family's first); ``overrides`` replace or add config fields."""
    family, departures = TINY_MODELS[name]
    common = dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=TINY_BLOCKS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.1, tie_word_embeddings=False,
    )
    return AutoConfig.for_model(family, **(common | departures | overrides))


def save_tiny_model(name: str, path: Path, sharded: bool = False, seed: int = 0, **overrides) -> Path:
    """``overrides``: config fields (``tiny_config``), e.g. a longer context."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, **overrides), dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="60KB" if sharded else "2GB")
    return path


_GGUF_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    # Phi-3's fused projections, as llama.cpp names them
    "self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",
}


def _llama_cpp_row_order(weight, heads: int):
    """The row permutation llama.cpp's converter applies to Llama/Mistral Q and K."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def save_tiny_gguf(family: str, path: Path, seed: int = 0, extra: dict[str, torch.Tensor] | None = None,
                   blocks: bool = True) -> dict[str, torch.Tensor]:
    """Write a tiny random model as a float32 GGUF the way llama.cpp would, with the ``extra`` tensors
    (by GGUF name), and without its blocks' tensors unless ``blocks`` (a file that must be refused
    before they are read); returns its HF state dict."""
    import gguf
    import numpy as np

    cfg = tiny_config(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random biases, so that a wrong row order in them shows
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), family)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    if hasattr(cfg, "rms_norm_eps"):
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    else:  # LayerNorm families (Falcon, BLOOM)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(cfg.vocab_size)
    permuted = family in ("llama", "mistral")
    for key, value in state.items():
        array = value.numpy()
        if key.startswith("model.layers.") and blocks:
            index, rest = key[len("model.layers."):].split(".", 1)
            if permuted and rest.startswith("self_attn.q_proj"):
                array = _llama_cpp_row_order(array, cfg.num_attention_heads)
            if permuted and rest.startswith("self_attn.k_proj"):
                array = _llama_cpp_row_order(array, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{index}.{_GGUF_BLOCK_NAMES[rest]}", np.ascontiguousarray(array))
        elif key == "model.embed_tokens.weight":
            writer.add_tensor("token_embd.weight", array)
        elif key == "model.norm.weight":
            writer.add_tensor("output_norm.weight", array)
        elif key == "lm_head.weight" and not cfg.tie_word_embeddings:
            writer.add_tensor("output.weight", array)
    for name, tensor in (extra or {}).items():
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


# Chat templates in the shape of each family's own (turn markers as the family's models write them, as
# plain text here: SmolLM2's vocabulary has no such special tokens), written for the tests: a model
# directory's template, whatever it is, is what petald's --chat and API apply.
CHAT_TEMPLATES = {
    "llama3": "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
              "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
              "<|end_header_id|>\n\n{% endif %}",
    "qwen3": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}",
    "phi3": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    "gemma2": "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
              "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
              "{% endif %}",
    "mixtral": "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
               "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}",
    # Falcon's instruct/chat models: plain-text turns, "User:" and "Falcon:".
    "falcon": "{% for m in messages %}{% if not loop.first %}\n{% endif %}{% if m['role'] == 'system' %}System: "
              "{% elif m['role'] == 'user' %}User: {% else %}Falcon: {% endif %}{{ m['content'] }}{% endfor %}"
              "{% if add_generation_prompt %}\nFalcon:{% endif %}",
}


def save_tiny_chat_model(path: Path, seed: int = 0, name: str = "llama") -> Path:
    """Tiny random model ``name`` that speaks SmolLM2's tokenizer (with the chat template of
    ``CHAT_TEMPLATES`` where it has one, else SmolLM2's), so that the text APIs (completions, chat)
    can run on it in milliseconds."""
    from petald.kernels.sources.open_source import open_source

    tokenizer = open_source(None).load_tokenizer()
    if name in CHAT_TEMPLATES:
        tokenizer.chat_template = CHAT_TEMPLATES[name]
    config = tiny_config(name)
    config.vocab_size = len(tokenizer)
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
