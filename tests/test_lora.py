"""PEFT LoRA adapters on a span's blocks, against peft itself on transformers' model.

Every adapter here is written by peft's own save_pretrained and read back by peft's
PeftModel.from_pretrained for the oracle, so both ends of the file format are peft's.
peft initialises lora_B to zero (an adapter that changes nothing); the tests fill it
with random values, and check that the adapter moves the logits, so that a LoRA
silently not applied would fail them.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from petald.kernels.adapters.lora import AdapterError, load_lora_adapter
from petald.kernels.client_head import ClientHead
from petald.kernels.executor import BatchedForward, DeviceExecutor
from petald.kernels.sources.open_source import open_source
from petald.kernels.span import BlockSpan
from tests.oracle import reference_logits
from tests.tiny_models import TINY_BLOCKS, tiny_config

CPU = torch.device("cpu")
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Every projection, plain alpha / r scaling.
FULL = dict(r=4, lora_alpha=8, target_modules=ALL_PROJECTIONS)
# Attention's projections only: a mixture of experts' MLP is not adapted.
ATTENTION = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
# Phi-3's every projection, q/k/v and gate/up fused in the model itself.
PHI3_FULL = dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
# Falcon's and BLOOM's module names, peft's own defaults for them
FUSED_QKV_FULL = dict(r=4, lora_alpha=8, target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])
# Some projections (q and v but not k: zero columns inside the fused qkv), some blocks, per-module
# ranks and alphas, rsLoRA scaling.
PARTIAL = dict(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], use_rslora=True,
               layers_to_transform=[1, 2, 4], rank_pattern={"v_proj": 2, "layers.4.mlp.down_proj": 6},
               alpha_pattern={"up_proj": 3})


def save_adapter(model_dir: Path, out: Path, seed: int = 0, safe: bool = True, **config) -> Path:
    """A peft LoRA of the model in ``model_dir`` with random (non-zero) weights, saved by peft."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.2)
    model.save_pretrained(str(out), safe_serialization=safe)
    return out


def peft_logits(model_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(ids).logits


def run_spans(spans: list[BlockSpan], head: ClientHead, prompt: torch.Tensor, decoded: torch.Tensor,
              adapter: str | None) -> torch.Tensor:
    """Logits at every position: a prefill of ``prompt``, then one decode step per token of ``decoded``."""
    total = prompt.shape[1] + decoded.shape[1]
    caches = [span.new_cache(prompt.shape[0], total) for span in spans]

    def through(hidden: torch.Tensor) -> torch.Tensor:
        for span, cache in zip(spans, caches, strict=True):
            hidden = span.forward(hidden, cache, adapter=adapter)
        return hidden

    logits = [head.logits(through(head.embed(prompt)))]
    for i in range(decoded.shape[1]):
        logits.append(head.logits(through(head.embed(decoded[:, i : i + 1]))))
    return torch.cat(logits, dim=1)


@pytest.fixture(scope="module")
def llama_adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_models["llama"]
    return {"full": save_adapter(model, root / "full", seed=1, **FULL),
            "partial": save_adapter(model, root / "partial", seed=2, **PARTIAL)}


def ids_of(seed: int, length: int) -> torch.Tensor:
    return torch.randint(0, 320, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("family", "config"), [("llama", FULL), ("llama", PARTIAL), ("qwen2", FULL), ("qwen3", FULL),
                                               ("phi3", PHI3_FULL), ("gemma2", FULL),
                                               ("mixtral", ATTENTION), ("falcon", FUSED_QKV_FULL),
                                               ("bloom", FUSED_QKV_FULL)],
                         ids=["llama-full", "llama-partial", "qwen2-full", "qwen3-full", "phi3-full", "gemma2-full",
                             "mixtral-attention", "falcon-full", "bloom-full"])
def test_spans_with_an_adapter_match_peft_through_prefill_and_decode(tiny_models, tmp_path, family, config):
    model_dir = tiny_models[family]
    adapter_dir = save_adapter(model_dir, tmp_path / "my-lora", seed=3, **config)
    source = open_source(str(model_dir))
    spans = [BlockSpan(source, 0, 2, torch.float32, CPU), BlockSpan(source, 2, TINY_BLOCKS, torch.float32, CPU)]
    for span in spans:
        adapter = span.load_adapter(adapter_dir)
        assert adapter.name == "my-lora"
        assert set(adapter.blocks) <= set(range(span.start, span.end))  # only its own blocks are kept
    prompt, decoded = ids_of(4, 9), ids_of(5, 4)
    ids = torch.cat([prompt, decoded], dim=1)
    want = peft_logits(model_dir, adapter_dir, ids)
    base = reference_logits(str(model_dir), ids)
    assert (want - base).abs().max() > 0.05  # the adapter does change the model

    head = ClientHead(source)
    got = run_spans(spans, head, prompt, decoded, adapter="my-lora")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    without = run_spans(spans, head, prompt, decoded, adapter=None)
    torch.testing.assert_close(without, base, atol=1e-4, rtol=1e-4)


def test_partial_adapter_touches_only_the_blocks_and_groups_it_targets(tiny_models, llama_adapters):
    config = open_source(str(tiny_models["llama"])).config
    adapter = load_lora_adapter(llama_adapters["partial"], config, 0, TINY_BLOCKS, torch.float32, CPU)
    assert sorted(adapter.blocks) == [1, 2, 4]
    assert adapter.block(0) is None and adapter.block(3) is None
    lora = adapter.block(1)
    h = torch.randn(3, 64)
    assert lora.delta("o", h) is None
    qkv = lora.delta("qkv", h)
    assert qkv.shape == (3, 64 + 32 + 32)
    assert torch.count_nonzero(qkv[:, 64:96]) == 0  # k is not adapted: its columns stay untouched
    assert torch.count_nonzero(qkv[:, :64]) > 0 and torch.count_nonzero(qkv[:, 96:]) > 0
    with pytest.raises(ValueError, match="loaded for blocks 2:4"):
        load_lora_adapter(llama_adapters["partial"], config, 2, 4, torch.float32, CPU).block(5)


def test_block_delta_equals_peft_modules_and_is_differentiable(tiny_models, llama_adapters):
    model_dir = tiny_models["llama"]
    config = open_source(str(model_dir)).config
    with torch.inference_mode():  # a server loads under inference mode; training must still work after
        adapter = load_lora_adapter(llama_adapters["partial"], config, 0, TINY_BLOCKS, torch.float32, CPU)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    layer = PeftModel.from_pretrained(base, str(llama_adapters["partial"])).base_model.model.model.layers[4]

    def peft_delta(module, x):
        return module.lora_B["default"](module.lora_A["default"](x)) * module.scaling["default"]

    h = torch.randn(2, 5, 64, requires_grad=True)
    got = adapter.block(4).delta("gate_up", h)
    want = torch.cat([torch.zeros(2, 5, 128), peft_delta(layer.mlp.up_proj, h)], dim=-1)  # gate is not adapted
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(got)
    (grad,) = torch.autograd.grad((got * weights).sum(), h)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), h)
    torch.testing.assert_close(grad, want_grad, atol=1e-5, rtol=1e-5)

    x = torch.randn(4, 128)
    torch.testing.assert_close(adapter.block(4).delta("down", x), peft_delta(layer.mlp.down_proj, x).detach(),
                               atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(adapter.block(4).delta("down", x), peft_delta(layer.mlp.down_proj, x),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown projection group"):
        adapter.block(4).delta("mlp", x)


def test_executor_never_mixes_adapters_in_one_forward(tiny_models, llama_adapters):
    source = open_source(str(tiny_models["llama"]))
    span = BlockSpan(source, 0, TINY_BLOCKS, torch.float32, CPU)
    span.load_adapter(llama_adapters["full"], name="full")
    span.load_adapter(llama_adapters["partial"], name="partial")
    head = ClientHead(source)
    sessions = [("full", 3), (None, 7), ("partial", 5), ("full", 11), (None, 4)]  # (adapter, prompt length)
    prompts = [torch.randint(0, 320, (1, n), generator=torch.Generator().manual_seed(n)) for _, n in sessions]
    nxt = head.embed(torch.tensor([[17]]))
    alone = []
    for (adapter, _), ids in zip(sessions, prompts, strict=True):
        cache = span.new_cache(1, 16)
        span.forward(head.embed(ids), cache, adapter=adapter)
        alone.append(span.forward(nxt, cache, adapter=adapter))
    assert not torch.allclose(alone[0], alone[3]) and (alone[1] - alone[4]).abs().max() > 0

    pool = span.new_pool(len(sessions) * 32 * TINY_BLOCKS)
    forwards: list[BatchedForward] = []
    executor = DeviceExecutor(span, on_forward=forwards.append)
    results: dict[int, object] = {}
    done_events = {i: threading.Event() for i in range(-1, len(sessions))}

    holding, hold = threading.Event(), threading.Event()

    def submit(i: int, cache, hidden: torch.Tensor, adapter: str | None) -> None:
        def done(result, error):
            if i == -1:  # keeps the executor thread busy while the next steps pile up
                holding.set()
                assert hold.wait(30)
            results[i] = error if error is not None else result
            done_events[i].set()

        executor.submit(cache, hidden, 0, TINY_BLOCKS, torch.float32, done, adapter=adapter)

    try:
        caches = [pool.open(1, 16) for _ in sessions]
        for i, ((adapter, _), ids) in enumerate(zip(sessions, prompts, strict=True)):
            submit(i, caches[i], head.embed(ids), adapter)
            assert done_events[i].wait(30)
            done_events[i].clear()
        # Hold the executor in a completion so that all five decode steps arrive for one turn.
        submit(-1, pool.open(1, 4), head.embed(torch.tensor([[1]])), None)
        assert holding.wait(30)
        forwards.clear()  # the holding step's own forward came before its completion
        for i, (adapter, _) in enumerate(sessions):
            submit(i, caches[i], nxt, adapter)
        hold.set()
        for i in range(len(sessions)):
            assert done_events[i].wait(30)
            torch.testing.assert_close(results[i], alone[i], atol=1e-5, rtol=1e-5)
        # One forward per adapter, each with every session of that adapter (the plain ones
        # together).
        ran = {f.adapter: [id(cache) for cache, _ in f.steps] for f in forwards}
        assert len(forwards) == len(ran) == 3
        assert ran == {"full": [id(caches[0]), id(caches[3])], None: [id(caches[1]), id(caches[4])],
                       "partial": [id(caches[2])]}
    finally:
        executor.shutdown()


def test_unknown_adapter_name_is_refused_and_spares_other_sessions(tiny_models, llama_adapters):
    source = open_source(str(tiny_models["llama"]))
    span = BlockSpan(source, 0, TINY_BLOCKS, torch.float32, CPU)
    span.load_adapter(llama_adapters["full"], name="full")
    hidden = ClientHead(source).embed(torch.tensor([[1, 2, 3]]))
    with pytest.raises(AdapterError, match="no adapter named 'other' .*holds: full"):
        span.forward(hidden, span.new_cache(1, 8), adapter="other")
    torch.testing.assert_close(span.forward(hidden, span.new_cache(1, 8), adapter=""),  # the wire's "none"
                               span.forward(hidden, span.new_cache(1, 8)))
    with pytest.raises(AdapterError, match="already holds an adapter named 'full'"):
        span.load_adapter(llama_adapters["partial"], name="full")
    narrow = load_lora_adapter(llama_adapters["full"], source.config, 0, 3, torch.float32, CPU, name="narrow")
    with pytest.raises(AdapterError, match="do not cover"):
        span.add_adapter(narrow)


@pytest.mark.parametrize(("quant", "tolerance"), [("int8", 0.05), ("int4", 0.3)])
def test_quantized_base_keeps_the_adapter_in_the_compute_dtype(tiny_models, llama_adapters, quant, tolerance):
    source = open_source(str(tiny_models["llama"]))
    # Two blocks: this strong random adapter inflates the activations, and with them the quantization error.
    dense = BlockSpan(source, 0, 2, torch.float32, CPU)
    quantized = BlockSpan(source, 0, 2, torch.float32, CPU, quant=quant)
    for span in (dense, quantized):
        span.load_adapter(llama_adapters["full"], name="full")
    hidden = ClientHead(source).embed(ids_of(6, 10))

    def run(span, adapter):
        return span.forward(hidden, span.new_cache(2, 10), adapter=adapter)

    effect = (run(dense, "full") - run(dense, None)).abs().max()
    assert effect > 1
    # What the adapter adds survives quantizing the base: without it the error would be the whole effect.
    assert (run(quantized, "full") - run(dense, "full")).abs().max() < tolerance * effect
    assert (run(quantized, "full") - run(quantized, None)).abs().max() > (1 - tolerance) * effect


def test_bfloat16_span_applies_the_adapter_in_bfloat16(tiny_models, llama_adapters):
    source = open_source(str(tiny_models["llama"]))
    full, half = (BlockSpan(source, 0, 2, dtype, CPU) for dtype in (torch.float32, torch.bfloat16))
    for span in (full, half):
        span.load_adapter(llama_adapters["partial"], name="partial")
    assert half.adapters["partial"].block(1).groups["qkv"].a_t.dtype == torch.bfloat16
    hidden = ClientHead(source).embed(ids_of(7, 6))
    want = full.forward(hidden, full.new_cache(2, 6), adapter="partial")
    got = half.forward(hidden, half.new_cache(2, 6), adapter="partial")
    base = full.forward(hidden, full.new_cache(2, 6))
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05 * (want - base).abs().max()


def test_fingerprint_pins_the_content_not_the_file_or_the_span(tiny_models, tmp_path):
    model_dir = tiny_models["llama"]
    config = open_source(str(model_dir)).config
    safe = save_adapter(model_dir, tmp_path / "safe", seed=8, **FULL)
    pickled = save_adapter(model_dir, tmp_path / "pickled", seed=8, safe=False, **FULL)
    other = save_adapter(model_dir, tmp_path / "other", seed=9, **FULL)
    assert (pickled / "adapter_model.bin").is_file() and not (pickled / "adapter_model.safetensors").exists()

    def load(path, start=0, end=TINY_BLOCKS):
        return load_lora_adapter(path, config, start, end, torch.float32, CPU)

    a, b = load(safe), load(pickled, 2, 5)
    assert len(a.fingerprint) == 32 and a.fingerprint == b.fingerprint
    assert load(other).fingerprint != a.fingerprint
    h = torch.randn(3, 64)
    torch.testing.assert_close(b.block(3).delta("qkv", h), a.block(3).delta("qkv", h))


def copy_with_config(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config.update(changes)
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(("changes", "message"), [
    (dict(peft_type="PREFIX_TUNING"), "peft_type is 'PREFIX_TUNING'; petald applies only LoRA"),
    (dict(use_dora=True), "DoRA"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="all"), "bias is 'all'"),
    (dict(init_lora_weights="pissa"), "rewrites the base model's weights"),
    (dict(target_modules=["q_proj", "lm_head"]), r"target_modules \['lm_head'\] are outside"),
    (dict(r=0), "r should be a positive integer"),
    (dict(rank_pattern={"v_proj": 3}), r"v_proj.lora_A.weight has shape \[4, 64\].*rank 3 needs \[3, 64\]"),
])
def test_config_refusals_name_the_file_and_the_problem(tiny_models, llama_adapters, tmp_path, changes, message):
    adapter_dir = copy_with_config(llama_adapters["full"], tmp_path / "bad", **changes)
    config = open_source(str(tiny_models["llama"])).config
    with pytest.raises(AdapterError, match=message) as caught:
        load_lora_adapter(adapter_dir, config, 0, TINY_BLOCKS, torch.float32, CPU)
    assert str(adapter_dir) in str(caught.value)


def test_file_refusals(tiny_models, llama_adapters, tmp_path):
    config = open_source(str(tiny_models["llama"])).config

    def load(path):
        return load_lora_adapter(path, config, 0, TINY_BLOCKS, torch.float32, CPU)

    with pytest.raises(AdapterError, match="nowhere does not exist"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="empty is not a PEFT adapter: it has no adapter_config.json"):
        load(tmp_path / "empty")
    no_weights = copy_with_config(llama_adapters["full"], tmp_path / "no-weights")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no-weights has no weights: expected adapter_model.safetensors"):
        load(no_weights)
    broken = copy_with_config(llama_adapters["full"], tmp_path / "broken")
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="cannot be read as JSON"):
        load(broken)
    poisoned = copy_with_config(llama_adapters["full"], tmp_path / "poisoned")
    tensors = load_file(poisoned / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, poisoned / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="layers.2.mlp.up_proj.lora_B.weight holds non-finite"):
        load(poisoned)
    with pytest.raises(AdapterError, match="adapter name 'a b'"):
        load_lora_adapter(llama_adapters["full"], config, 0, TINY_BLOCKS, torch.float32, CPU, name="a b")


def test_weights_outside_the_block_projections_are_refused(tiny_models, tmp_path):
    adapter_dir = save_adapter(tiny_models["llama"], tmp_path / "head", r=2, lora_alpha=2,
                               target_modules=["q_proj", "lm_head"])
    config = open_source(str(tiny_models["llama"])).config
    with pytest.raises(AdapterError, match=r"target_modules \['lm_head'\] are outside"):
        load_lora_adapter(adapter_dir, config, 0, TINY_BLOCKS, torch.float32, CPU)
    # Even when the config does not say so, a tensor of another module is refused by its name.
    copy_with_config(adapter_dir, tmp_path / "hidden", target_modules="q_proj|lm_head")
    with pytest.raises(AdapterError, match=r"holds base_model\.model\.lm_head\..*, which is not a LoRA"):
        load_lora_adapter(tmp_path / "hidden", config, 0, TINY_BLOCKS, torch.float32, CPU)


def test_an_adapter_of_projections_the_model_fuses_otherwise_is_refused(tiny_models, llama_adapters):
    """An adapter of separate q/k/v modules meets Phi-3, whose q/k/v are one module: refused by name."""
    with pytest.raises(AdapterError, match=re.escape(
            "holds base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight, but this phi3 model has no gate_proj "
            "(its block projections: qkv_proj, o_proj, gate_up_proj, down_proj): the adapter was trained for another")):
        load_lora_adapter(llama_adapters["full"], tiny_config("phi3"), 0, TINY_BLOCKS, torch.float32, CPU)


def test_an_adapter_for_another_model_is_refused(tiny_models, llama_adapters):
    wider = tiny_config("llama")
    wider.hidden_size, wider.head_dim = 96, 24
    with pytest.raises(AdapterError, match=r"has shape .* but this model \(llama, hidden size 96\).*another model"):
        load_lora_adapter(llama_adapters["full"], wider, 0, TINY_BLOCKS, torch.float32, CPU)
    fewer = tiny_config("llama")
    fewer.num_hidden_layers = 3
    with pytest.raises(AdapterError, match="adapts block 3, but the model has 3 blocks"):
        load_lora_adapter(llama_adapters["full"], fewer, 0, 3, torch.float32, CPU)
    more_kv = tiny_config("llama")
    more_kv.num_key_value_heads = 4
    with pytest.raises(AdapterError, match=r"k_proj.lora_B.weight has shape \[32, 4\].*needs \[64, 4\]"):
        load_lora_adapter(llama_adapters["full"], more_kv, 0, TINY_BLOCKS, torch.float32, CPU)


def test_training_forward_and_backward_with_an_adapter_match_peft(tiny_models, llama_adapters):
    from petald.kernels.training_forward import span_backward, span_forward

    model_dir = tiny_models["llama"]
    source = open_source(str(model_dir))
    span = BlockSpan(source, 1, 5, torch.float32, CPU)
    adapter = span.load_adapter(llama_adapters["partial"], name="partial")
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(llama_adapters["partial"])).eval()
    embeds = ClientHead(source).embed(ids_of(9, 7)).clone().requires_grad_()
    states = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states  # [k]: the input of block k
    grad_output = torch.randn_like(states[5])
    (want_grad,) = torch.autograd.grad((states[5] * grad_output).sum(), states[1])

    hidden = states[1].detach()
    torch.testing.assert_close(span_forward(span, hidden, 1, 5, adapter=adapter).detach(), states[5].detach(),
                               atol=1e-4, rtol=1e-4)
    grad, _ = span_backward(span, hidden, grad_output, 1, 5, adapter=adapter)
    torch.testing.assert_close(grad, want_grad, atol=1e-4, rtol=1e-4)
    (plain_grad, _) = span_backward(span, hidden, grad_output, 1, 5)
    assert (plain_grad - want_grad).abs().max() > 1e-2  # the adapter does change the gradient


@pytest.mark.slow
def test_clients_pick_an_adapter_by_name_and_are_routed_to_its_servers(tiny_models, llama_adapters):
    """A swarm where one server holds every block without adapters and two hold the adapter: a client
    naming the adapter is routed only through those two (found in the DHT), and its logits, greedy
    tokens and prompt gradients equal peft's; a client without it keeps the one-hop base route."""
    import torch.nn.functional as F

    from petald.cli.local_swarm import LocalSwarm
    from petald.p2pnode.client.distributed_model import DistributedModel
    from petald.p2pnode.routing.route import NoRouteError

    path = tiny_models["llama"]
    adapter_dir = llama_adapters["full"]
    name = adapter_dir.name
    ids = ids_of(11, 10)
    with LocalSwarm(["0:6"], model=str(path), extra_args=["--threads", "1"]) as swarm:
        swarm.add("0:3", ["--adapters", str(adapter_dir)])
        swarm.add("3:6", ["--adapters", str(adapter_dir)])
        assert any(f"adapters: {name}" in line for line in swarm.servers[1].output)
        with DistributedModel(initial_peers=swarm.addresses[:1], model=str(path), adapter=name, wire="float32") as model:
            route = model.route()
            assert [(h.start, h.end) for h in route.hops] == [(0, 3), (3, 6)]
            torch.testing.assert_close(model.forward(ids), peft_logits(path, adapter_dir, ids), atol=1e-4, rtol=1e-4)

            base = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
            with torch.no_grad():
                expected = peft_model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                               pad_token_id=0)
            assert model.generate(ids, max_new_tokens=8, eos_token_id=[]).tolist() == expected.tolist()

            # A soft prompt's gradient through the adapted servers equals peft's autograd.
            prompt = (torch.randn(3, 64, generator=torch.Generator().manual_seed(12)) * 0.5).requires_grad_()
            one = ids[:1]
            x = torch.cat([prompt[None], model.head.embed_detached(one)], dim=1)
            logits = model.head.logits_with_grad(model.remote_blocks(x))[:, 3:]
            F.cross_entropy(logits[0, :-1], one[0, 1:]).backward()
            ref_prompt = prompt.detach().clone().requires_grad_()
            ref_logits = peft_model(inputs_embeds=torch.cat(
                [ref_prompt[None], base.model.embed_tokens(one)], dim=1)).logits[:, 3:]
            F.cross_entropy(ref_logits[0, :-1], one[0, 1:]).backward()
            torch.testing.assert_close(prompt.grad, ref_prompt.grad, rtol=1e-4,
                                       atol=5e-5 * float(ref_prompt.grad.abs().max()))

        with DistributedModel(initial_peers=swarm.addresses[:1], model=str(path), wire="float32") as model:
            assert [(h.start, h.end) for h in model.route().hops] == [(0, 6)]
            torch.testing.assert_close(model.forward(ids), reference_logits(str(path), ids), atol=1e-4, rtol=1e-4)

        with DistributedModel(initial_peers=swarm.addresses[:1], model=str(path), adapter="no-such-adapter",
                              recovery_timeout=1) as model:
            with pytest.raises(NoRouteError, match="holding adapter 'no-such-adapter'"):
                model.route()
