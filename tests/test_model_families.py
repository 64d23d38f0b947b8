"""The per-family rules (kernels/models/) against transformers' own models of each family: sliding
windows, q/k/v biases and dimensions; and that every family served has a tiny model in the tests."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from petald.kernels.memory_plan import weight_bytes_per_block
from petald.kernels.models.dims import ModelDims
from petald.kernels.models.features import served_positions
from petald.kernels.models.registry import FAMILIES as FAMILY_RULES
from petald.kernels.models.registry import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedArchitecture,
    family_of,
)
from petald.kernels.sources.model_source import ModelSourceError, check_supported
from petald.kernels.sources.open_source import open_source
from petald.kernels.span import BlockSpan
from tests.petald_cli import assert_refused, invoke
from tests.tiny_models import FAMILIES, TINY_BLOCKS, TINY_MODELS, tiny_config


def _variants() -> list[tuple[str, object]]:
    """Each Llama-shaped family's tiny config (its tensors under ``model.layers.N``, its attention through
    transformers' attention functions), and the options that change its rules."""
    windowed_qwen2 = tiny_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    biased_llama = tiny_config("llama", attention_bias=True)
    wide_heads = tiny_config("llama", head_dim=32)
    llama_shaped = [name for name, (family, _) in TINY_MODELS.items()
                    if FAMILY_RULES[family].block_prefix == "model.layers.{index}."]
    return [(name, tiny_config(name)) for name in llama_shaped] + [
        ("qwen2 with sliding windows", windowed_qwen2), ("llama with biases", biased_llama),
        ("llama with a head size not hidden / heads", wide_heads)]


VARIANTS = _variants()

# Falcon's generations and options, each against transformers in one process (test_falcon_variants_...):
# the tiny model is the new architecture with two norms and biases.
FALCON_VARIANTS = {
    "one shared norm (num_ln_in_parallel_attn 1)": {"num_ln_in_parallel_attn": 1},
    "no biases (as Falcon-40B/180B)": {"bias": False},
    "Falcon-7B: multi-query, parallel, one norm": {"new_decoder_architecture": False, "multi_query": True,
                                                   "bias": False},
    "older: heads interleaved, sequential": {"new_decoder_architecture": False, "multi_query": False,
                                             "parallel_attn": False, "num_kv_heads": 4},
}


def test_every_family_served_has_a_tiny_model_in_the_tests():
    assert SUPPORTED_ARCHITECTURES == tuple(sorted(FAMILIES))


def attention_transformers_runs(model, monkeypatch) -> list[dict]:
    """What each layer of ``model`` hands its attention function in a forward (its sliding window, score
    scale and soft-cap): what transformers' own modules decide (from a layer's attribute, as Qwen2's, or
    the config, as Mistral's), read where they use it, in whichever implementation the model runs."""
    seen: dict[int, dict] = {}
    implementation = model.config._attn_implementation
    attention_module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    run = ALL_ATTENTION_FUNCTIONS[implementation] if implementation != "eager" else \
        attention_module.eager_attention_forward

    def recording(module, *args, **kwargs):
        seen[module.layer_idx] = {k: kwargs.get(k) for k in ("sliding_window", "scaling", "softcap")}
        return run(module, *args, **kwargs)

    if implementation == "eager":  # the module's own function (Gemma 2's: no sdpa, for its soft-capping)
        monkeypatch.setattr(attention_module, "eager_attention_forward", recording)
    else:
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, implementation, recording)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    return [seen[i] for i in range(len(model.model.layers))]


@pytest.mark.parametrize(("name", "config"), VARIANTS, ids=[name for name, _ in VARIANTS])
def test_family_rules_match_transformers(name, config, monkeypatch):
    model = AutoModelForCausalLM.from_config(config)
    layers = model.model.layers
    family, dims = family_of(config), ModelDims.of(config)
    runs = attention_transformers_runs(model, monkeypatch)
    assert [family.sliding_window(config, i) for i in range(TINY_BLOCKS)] == [r["sliding_window"] for r in runs]
    scale = family.attention_scale(config)
    assert all(r["scaling"] == (dims.head_dim ** -0.5 if scale is None else scale) for r in runs)
    assert all(r["softcap"] == family.attention_softcap(config) for r in runs)
    assert family.final_softcap(config) == getattr(config, "final_logit_softcapping", None)
    names = {k.split(".", 3)[3].removesuffix(".weight") for k in model.state_dict() if k.startswith("model.layers.0.")}
    assert {n for n in family.block_norms if n is not None} == {n for n in names if n.endswith("layernorm")}
    attention = layers[0].self_attn
    layer = {k.split(".", 3)[3]: v for k, v in model.state_dict().items() if k.startswith("model.layers.0.")}
    assert family.qkv_bias(config) == all(f"{n}.bias" in layer for n in family.qkv_projections)
    assert dims.head_dim == attention.head_dim
    assert family.qk_norm == hasattr(attention, "q_norm") == hasattr(attention, "k_norm")
    assert sum(layer[f"{n}.weight"].shape[0] for n in family.qkv_projections) == dims.q_size + 2 * dims.kv_size
    assert layer["self_attn.o_proj.weight"].shape == (dims.hidden, dims.q_size)
    if family.experts is None:
        assert sum(layer[f"{n}.weight"].shape[0] for n in family.gate_up_projections) == 2 * dims.intermediate
        assert layer["mlp.down_proj.weight"].shape == (dims.hidden, dims.intermediate)
    else:  # every expert's MLP where the family's layout says, and the router
        experts, moe = family.experts, layers[0].mlp
        assert (moe.top_k, moe.experts.num_experts) == (getattr(config, experts.top_k_key),
                                                        getattr(config, experts.count_key))
        saved = {k.split(".", 3)[3] for k in _saved_state(model) if k.startswith("model.layers.0.")}
        for e in range(moe.experts.num_experts):
            prefix = experts.expert.format(expert=e)
            assert {f"{prefix}.{n}.weight" for n in (experts.gate, experts.up, experts.down)} <= saved
        assert f"{experts.router}.weight" in saved


def _saved_state(model) -> set[str]:
    """The tensor names ``model`` saves (transformers may save them otherwise than it holds them:
    Mixtral's experts as one w1/w2/w3 each)."""
    import tempfile

    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        with safe_open(f"{folder}/model.safetensors", "pt") as f:
            return set(f.keys())


def test_windows_and_biases_differ_where_the_families_do():
    """So that the test above compares rules that matter: each variant departs from plain llama."""
    windows = {name: [family_of(c).sliding_window(c, i) for i in range(TINY_BLOCKS)] for name, c in VARIANTS}
    assert windows["llama"] == [None] * TINY_BLOCKS and windows["mistral"] == [24] * TINY_BLOCKS
    assert windows["qwen2 with sliding windows"] == [None, None] + [8] * (TINY_BLOCKS - 2)
    assert [family_of(c).qkv_bias(c) for _, c in VARIANTS[:3]] == [False, False, True]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_memory_plan_counts_a_blocks_weights_exactly(tiny_models, family):
    """In float32 without quantization, the planned bytes are those of a loaded block's tensors."""
    from petald.kernels.sources.open_source import open_source

    source = open_source(str(tiny_models[family]))
    block = BlockSpan(source, 0, 1, torch.float32, torch.device("cpu")).blocks[0]
    norms = (block.ln_attn, block.ln_attn_out, block.ln_mlp, block.ln_mlp_out, block.q_norm, block.k_norm)
    # A norm both branches read (Falcon's shared one) is held once.
    tensors = [t for norm in {id(n): n for n in norms if n is not None}.values() for t in norm.tensors()]
    linears = [block.qkv, block.o]
    if block.moe is None:
        linears += [block.gate_up, block.down]
    else:
        tensors.append(block.moe.router)
        linears += [linear for expert in block.moe.experts for linear in (expert.gate_up, expert.down)]
    for linear in linears:
        tensors += [linear.weight_t] + ([linear.bias] if linear.bias is not None else [])
    assert weight_bytes_per_block(source.config, torch.float32) == sum(t.numel() * 4 for t in tensors)


@pytest.mark.parametrize("changes", FALCON_VARIANTS.values(), ids=FALCON_VARIANTS)
def test_falcon_variants_match_transformers(tmp_path, changes):
    """Logits of a prompt and of three decode steps over two spans (paged KV cache), and the memory plan,
    for each q/k/v layout, norm arrangement and residual Falcon's configs choose between."""
    from tests.test_kernels import run_local

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("falcon", **changes), dtype=torch.float32).eval()
    model.save_pretrained(tmp_path)
    source = open_source(str(tmp_path))
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    logits, tokens = run_local(source, ids, 3, [(0, 3), (3, TINY_BLOCKS)])
    with torch.no_grad():
        full = model(torch.cat([ids, torch.tensor([tokens])], dim=1)).logits
    torch.testing.assert_close(logits, full[:, :12], atol=1e-4, rtol=1e-4)
    assert tokens == full[0, 11:14].argmax(-1).tolist()
    block_bytes = sum(t.numel() * 4 for k, t in model.state_dict().items() if k.startswith("transformer.h.0."))
    assert weight_bytes_per_block(source.config, torch.float32) == block_bytes


def test_falcon_configs_transformers_cannot_run_are_refused(tiny_models, tmp_path):
    model = _with_config(tiny_models["falcon"], tmp_path / "odd", alibi=True, parallel_attn=False)
    with pytest.raises(ModelSourceError, match=r"this falcon model cannot be served: Falcon with ALiBi \(alibi: true, "
                                               r"Falcon-RW\) is not supported; the new decoder architecture without "
                                               "parallel_attn is not supported"):
        open_source(str(model))


@pytest.mark.parametrize("heads", [1, 4, 6, 12, 16, 112])  # 112: BLOOM-176B's; 6 and 12 are not powers of two
def test_alibi_slopes_are_blooms(heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    from petald.kernels.alibi import alibi_slopes

    assert torch.equal(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")))


def test_a_bloom_checkpoint_saved_from_its_base_model_is_read(tiny_models, tmp_path):
    """BLOOM's own checkpoints name their tensors ``h.N.*`` and ``word_embeddings*`` (saved from BloomModel,
    without ``transformer.``): the same weights give the same logits. And ALiBi is what makes them
    transformers' (the tiny model's logits move without it), so a dropped bias would fail the checks."""
    from safetensors.torch import load_file, save_file

    from petald.kernels.client_head import ClientHead

    shutil.copytree(tiny_models["bloom"], tmp_path / "base")
    weights = tmp_path / "base" / "model.safetensors"
    save_file({k.removeprefix("transformer."): v for k, v in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(2))

    def logits(path, alibi: bool = True):
        source = open_source(str(path))
        span, head = BlockSpan(source, 0, TINY_BLOCKS, torch.float32, torch.device("cpu")), ClientHead(source)
        for block in span.blocks if not alibi else ():
            block.alibi = torch.zeros_like(block.alibi)  # no bias: attention blind to positions but causality
        return head.logits(span.forward(head.embed(ids), span.new_cache(1, 24)))

    assert not any(k.startswith("transformer.") for k in load_file(weights))
    torch.testing.assert_close(logits(tmp_path / "base"), logits(tiny_models["bloom"]), atol=0, rtol=0)
    assert (logits(tiny_models["bloom"], alibi=False) - logits(tiny_models["bloom"])).abs().max() > 0.05


def test_bloom_with_residuals_after_its_norms_is_refused(tiny_models, tmp_path):
    model = _with_config(tiny_models["bloom"], tmp_path / "odd", apply_residual_connection_post_layernorm=True)
    with pytest.raises(ModelSourceError, match="this bloom model cannot be served: "
                                               "apply_residual_connection_post_layernorm"):
        open_source(str(model))


def test_other_architectures_are_refused_naming_those_served():
    served = ", ".join(SUPPORTED_ARCHITECTURES)
    config = AutoConfig.for_model("gpt2")
    with pytest.raises(UnsupportedArchitecture):
        family_of(config)
    with pytest.raises(ModelSourceError, match=r"^here: architecture 'gpt2' is not supported; "
                                                f"petald serves {served}$"):
        check_supported(config, "here")


def _with_config(source_dir, target, **changes):
    """A copy of the model directory ``source_dir`` at ``target`` whose config.json has ``changes``."""
    shutil.copytree(source_dir, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | changes))
    return target


# Config features petald does not implement, and the words it refuses each with.
REFUSED_FEATURES = [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "rope scaling type 'dynamic' is not supported (petald implements default, linear, llama3, yarn, longrope)"),
    ({"partial_rotary_factor": 0.5}, "a partial rotary embedding (partial_rotary_factor 0.5) is not supported"),
    ({"hidden_act": "relu2"}, "the activation 'relu2' is not supported (petald implements silu, swish, gelu, "
                              "gelu_pytorch_tanh)"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "pre-quantized weights (quantization_config: "
                                                                   "gptq) are not supported; use the unquantized "
                                                                   "model and petald's --quant"),
]


@pytest.mark.parametrize(("changes", "words"), REFUSED_FEATURES, ids=[w.split(" (")[0] for _, w in REFUSED_FEATURES])
def test_a_config_feature_petald_does_not_implement_is_refused_by_name(tiny_models, tmp_path, changes, words):
    """At open, by client and server alike, before any weight is read; the CLI says it as a sentence."""
    model = _with_config(tiny_models["llama"], tmp_path / "odd", **changes)
    with pytest.raises(ModelSourceError) as refused:
        open_source(str(model))
    assert str(refused.value) == f"{model}: this llama model cannot be served: {words}"
    result = invoke("serve", "--blocks", "0:2", "--new-swarm", "--model", str(model))
    assert_refused(result, 1, f"petald: error: {refused.value}")


def test_several_refused_features_are_named_together(tiny_models, tmp_path):
    model = _with_config(tiny_models["llama"], tmp_path / "odd", hidden_act="relu2",
                         rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ModelSourceError, match="'dynamic' is not supported .*; the activation 'relu2'"):
        open_source(str(model))


def test_a_generation_configs_end_of_sequence_ids_join_the_configs(tiny_models, tmp_path):
    """Llama 3.0 Instruct: config.json names <|end_of_text|>, generation_config.json also <|eot_id|>."""
    model = _with_config(tiny_models["llama"], tmp_path / "instruct", eos_token_id=2)
    assert open_source(str(model)).config.eos_token_id == 2
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    assert open_source(str(model)).config.eos_token_id == [2, 7]
    (model / "generation_config.json").write_text("[1, 2")
    with pytest.raises(ModelSourceError, match="generation_config.json is not a readable generation config"):
        open_source(str(model))


def test_longrope_is_served_up_to_its_original_length_only(tiny_models):
    """Past original_max_position_embeddings transformers turns to the long factors for new tokens only;
    petald's cache of rotated keys cannot follow, so a step there is refused rather than served wrong."""
    source = open_source(str(tiny_models["phi3"]))
    span = BlockSpan(source, 0, 1, torch.float32, torch.device("cpu"))
    assert source.config.max_position_embeddings == 256 and span.max_positions == served_positions(source.config) == 64
    cache = span.new_cache(1, 65)
    span.forward(torch.zeros(1, 64, 64), cache)
    with pytest.raises(ValueError, match="positions beyond the model's 64"):
        span.forward(torch.zeros(1, 1, 64), cache)
