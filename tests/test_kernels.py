"""The executor's blocks against transformers' own models, in one process."""

from __future__ import annotations

import pytest
import torch

from petald.kernels.client_head import ClientHead
from petald.kernels.models.dims import ModelDims
from petald.kernels.models.registry import FAMILIES as SERVED
from petald.kernels.sampling import sample_next
from petald.kernels.sources.model_source import ModelSourceError
from petald.kernels.sources.open_source import open_source
from petald.kernels.span import BlockSpan
from tests.oracle import reference_greedy, reference_logits
from tests.tiny_models import FAMILIES, TINY_BLOCKS, TINY_MODELS, save_tiny_model, tiny_config

CPU = torch.device("cpu")


def run_local(source, ids: torch.Tensor, new_tokens: int, chunks: list[tuple[int, int]]):
    """Greedy decode through several BlockSpans, as separate servers would run them."""
    spans = [BlockSpan(source, a, b, torch.float32, CPU) for a, b in chunks]
    head = ClientHead(source)
    caches = [s.new_cache(ids.shape[0], ids.shape[1] + new_tokens) for s in spans]

    def through(h):
        for span, cache in zip(spans, caches, strict=True):
            h = span.forward(h, cache)
        return h

    logits = head.logits(through(head.embed(ids)))
    first_logits, tokens = logits, []
    for _ in range(new_tokens):
        nxt = sample_next(logits[:, -1])
        tokens.append(int(nxt[0]))
        logits = head.logits(through(head.embed(nxt[:, None])))
    return first_logits, tokens


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_matches_transformers(tiny_models, name):
    path = tiny_models[name]
    source = open_source(str(path))
    ids = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(1))
    logits, tokens = run_local(source, ids, 12, [(0, 2), (2, 5), (5, TINY_BLOCKS)])
    torch.testing.assert_close(logits, reference_logits(str(path), ids), atol=1e-4, rtol=1e-4)
    assert tokens == reference_greedy(str(path), ids, 12)


def test_sharded_directory_loads_same_weights(tiny_models, sharded_llama):
    whole, sharded = open_source(str(tiny_models["llama"])), open_source(str(sharded_llama))
    assert whole.identity.fingerprint == sharded.identity.fingerprint
    a, b = whole.block_tensors(3), sharded.block_tensors(3)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k])


def test_fingerprint_differs_for_other_weights(tmp_path, tiny_models):
    other = save_tiny_model("llama", tmp_path / "other", seed=7)
    assert open_source(str(other)).identity.fingerprint != open_source(str(tiny_models["llama"])).identity.fingerprint


class WatchedSource:
    """A model source that passes on what another gives, noting which blocks were asked for; with
    ``refuse_blocks``, asking for one fails the test."""

    def __init__(self, source, refuse_blocks: bool = False):
        self.source, self.refuse_blocks = source, refuse_blocks
        self.config, self.identity = source.config, source.identity
        self.blocks_asked: list[int] = []

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        if self.refuse_blocks:
            raise AssertionError(f"block {index} was read")
        self.blocks_asked.append(index)
        return self.source.block_tensors(index)

    def client_tensors(self) -> dict[str, torch.Tensor]:
        return self.source.client_tensors()

    def load_tokenizer(self):
        return self.source.load_tokenizer()


def test_server_loads_only_its_blocks(tiny_models):
    source = WatchedSource(open_source(str(tiny_models["llama"])))
    BlockSpan(source, 2, 4, torch.float32, CPU)
    assert source.blocks_asked == [2, 3]


def test_default_model_matches_transformers():
    source = open_source(None)
    assert source.config.num_hidden_layers == 30
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    logits, tokens = run_local(source, ids, 8, [(0, 12), (12, 30)])
    torch.testing.assert_close(logits, reference_logits(None, ids), atol=1e-3, rtol=1e-4)
    assert tokens == reference_greedy(None, ids, 8)


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match="not found"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ModelSourceError):
        open_source(str(tmp_path))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[10.0, 9.0, -5.0, -5.0]])
    gen = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, temperature=1.0, top_p=0.5, generator=gen)) for _ in range(50)}
    assert seen == {0}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_span_stays_close_to_float32(tiny_models, dtype):
    source = open_source(str(tiny_models["llama"]))
    hidden = ClientHead(source).embed(torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(2)))
    full = BlockSpan(source, 0, TINY_BLOCKS, torch.float32, CPU)
    half = BlockSpan(source, 0, TINY_BLOCKS, dtype, CPU)
    want = full.forward(hidden, full.new_cache(2, 16))
    got = half.forward(hidden, half.new_cache(2, 16))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("family", [f for f in FAMILIES if SERVED[f].gguf_supported])
def test_gguf_tensors_load_back_in_hugging_face_order(tmp_path, family):
    from tests.tiny_models import save_tiny_gguf

    state = save_tiny_gguf(family, tmp_path / f"tiny-{family}.gguf")
    source = open_source(str(tmp_path / f"tiny-{family}.gguf"))
    assert source.config.model_type == family
    assert ModelDims.of(source.config) == ModelDims.of(tiny_config(family))  # Qwen3's head size too
    for index in (0, TINY_BLOCKS - 1):
        block = source.block_tensors(index)
        expected = {k.split(f"model.layers.{index}.", 1)[1]: v for k, v in state.items()
                    if k.startswith(f"model.layers.{index}.")}
        assert block.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(block[name], tensor), f"{family} block {index} {name}"
    client = source.client_tensors()
    assert torch.equal(client["embed_tokens.weight"], state["model.embed_tokens.weight"])
    assert torch.equal(client["lm_head.weight"], state.get("lm_head.weight", state["model.embed_tokens.weight"]))


def test_a_gguf_with_rope_factor_tensors_is_refused_by_name(tmp_path):
    """Llama 3.1+ (rope_freqs) and Phi-3 128k (rope_factors_long/short) GGUFs carry their rope scaling as
    tensors transformers' parser does not read: served without them, every token would be wrong."""
    from tests.tiny_models import save_tiny_gguf

    path = tmp_path / "tiny-rope.gguf"
    save_tiny_gguf("llama", path, extra={"rope_freqs.weight": torch.ones(8), "rope_factors_long.weight": torch.ones(8)})
    with pytest.raises(ModelSourceError, match=r"tiny-rope.gguf: GGUF rope frequency factors \(rope_factors_long, "
                                               r"rope_freqs\) are not supported yet; use the model's Hugging Face"):
        open_source(str(path))


def test_a_mixture_of_experts_gguf_is_refused_by_name(tmp_path):
    """llama.cpp writes Mixtral as a "llama" with stacked experts: read as a dense Llama, every MLP would
    be missing."""
    from tests.tiny_models import save_tiny_gguf

    path = tmp_path / "tiny-moe.gguf"
    save_tiny_gguf("llama", path, extra={"blk.0.ffn_gate_exps.weight": torch.zeros(4, 128, 64)}, blocks=False)
    with pytest.raises(ModelSourceError, match=r"tiny-moe.gguf: mixture-of-experts GGUF files \(Mixtral's "
                                               r"ffn_\*_exps\) are not supported yet"):
        open_source(str(path))


@pytest.mark.parametrize("family", ["gemma2", "falcon", "bloom"])
def test_a_gguf_of_a_family_whose_gguf_petald_does_not_read_is_refused(tmp_path, family):
    """Gemma 2's GGUF norms hold 1 + w (llama.cpp's converter); Falcon's and BLOOM's fused q/k/v are
    rearranged by it and their norms named its own way: read as Hugging Face's tensors, every token would be
    wrong, so the file is refused by name before any tensor is read."""
    from tests.tiny_models import save_tiny_gguf

    path = tmp_path / f"tiny-{family}.gguf"
    save_tiny_gguf(family, path, blocks=False)
    with pytest.raises(ModelSourceError, match=rf"tiny-{family}.gguf: GGUF files of {family} models are not "
                                               r"supported yet; use the model's Hugging Face directory"):
        open_source(str(path))


def test_client_head_reads_no_block_tensors(tiny_models):
    source = WatchedSource(open_source(str(tiny_models["qwen2"])), refuse_blocks=True)
    head = ClientHead(source)
    logits = head.logits(head.embed(torch.tensor([[1, 2, 3]])))
    assert logits.shape == (1, 3, 320)
    # qwen2 tiny ties its LM head to the embeddings: one matrix in memory (the head's, stored transposed)
    assert head.embed_weight.data_ptr() == head.lm_head.weight_t.data_ptr()
    assert torch.equal(head.embed_weight, source.client_tensors()["embed_tokens.weight"])


def test_gguf_config_and_tokenizer_come_back_equal_from_the_cache(tmp_path, monkeypatch):
    from petald.kernels.sources.gguf_source import GGUFSource
    from petald.kernels.sources.open_source import default_gguf_path

    monkeypatch.setenv("PETALD_CACHE_DIR", str(tmp_path))
    first = GGUFSource(default_gguf_path())
    parsed, tokenizer = first.config.to_dict(), first.load_tokenizer()
    assert (first._derived_dir() / "config.json").is_file() and (first._derived_dir() / "tokenizer").is_dir()
    again = GGUFSource(default_gguf_path())
    assert again.config.to_dict() == parsed
    cached = again.load_tokenizer()
    text = "The capital of France is Paris. ¿Qué tal? 東京"
    assert cached(text).input_ids == tokenizer(text).input_ids
    assert cached.chat_template == tokenizer.chat_template and cached.eos_token_id == tokenizer.eos_token_id


def test_throughput_is_measured_again_after_a_kernel_change(tiny_models):
    from petald.kernels.throughput import KERNELS_REVISION, SpanThroughput, cached_throughput

    span = BlockSpan(open_source(str(tiny_models["llama"])), 0, 2, torch.float32, torch.device("cpu"))
    measured = []

    def measure() -> SpanThroughput:
        measured.append(1)
        return SpanThroughput(inference_rps=10.0 * len(measured), forward_tps=100.0)

    first, cached = cached_throughput(span, "fp-kernels", "none", measure)
    assert not cached
    again, cached = cached_throughput(span, "fp-kernels", "none", measure)
    assert cached and again == first and len(measured) == 1
    newer, cached = cached_throughput(span, "fp-kernels", "none", measure,
                                      kernels_revision=KERNELS_REVISION + 1)
    assert not cached and newer.inference_rps == 20.0
    again, cached = cached_throughput(span, "fp-kernels", "none", measure)
    assert cached and again == first  # the old kernels' figures are still theirs


@pytest.mark.parametrize(("setting", "quant", "labels"), [
    ("PETALD_NATIVE_INT4", "int4", {"0": "int4 torch kernel", "1": "int4 petald {int4} kernel"}),
    ("PETALD_NATIVE_ATTENTION", "none", {"0": "none, torch attention", "1": "none, {attention} attention"}),
    ("PETALD_CPU_KERNELS", "int4", {"avx2": "int4 petald avx2 kernel, avx2 attention",
                                    "torch": "int4 torch kernel, torch attention"}),
])
def test_throughput_is_measured_per_kernel_choice(tiny_models, monkeypatch, tmp_path, setting, quant, labels):
    """Where a process chooses between one of petald's C kernels (and its variant for this CPU) and torch's
    (the int4 matmul, decode attention), they differ in speed: a server measures, caches and announces the
    one it runs."""
    from petald.kernels.native.decode_attention import decode_attention_kernel
    from petald.kernels.native.int4_native import int4_kernel
    from petald.kernels.native.native_library import CpuKernelError
    from petald.kernels.throughput import SpanThroughput, cached_throughput, kernel_of

    if setting != "PETALD_NATIVE_INT4":
        monkeypatch.setenv("PETALD_NATIVE_INT4", "1")  # petald's int4 kernel, not whichever measures faster here
    try:
        with monkeypatch.context() as forced:
            forced.setenv("PETALD_CPU_KERNELS", "avx2" if setting == "PETALD_CPU_KERNELS" else "auto")
            kernels = (int4_kernel(), decode_attention_kernel(torch.float32, torch.device("cpu"), 16))
    except CpuKernelError as exc:
        pytest.skip(str(exc))
    if None in kernels:
        pytest.skip("petald's C kernels need a C compiler and a CPU with AVX512F (int4: AVX512-BF16) or AVX2 and FMA")
    monkeypatch.setenv("PETALD_CACHE_DIR", str(tmp_path))
    source = open_source(str(tiny_models["llama"]))
    spans = {}
    for value in labels:
        monkeypatch.setenv(setting, value)
        spans[value] = BlockSpan(source, 0, 2, torch.float32, torch.device("cpu"), quant=quant)
        label = kernel_of(spans[value], quant)
        if quant == "int4" and setting == "PETALD_NATIVE_INT4":
            label = label.rsplit(", ", 1)[0]  # the attention's part is the next case's
        assert label == labels[value].format(int4=kernels[0].isa, attention=kernels[1].isa)
    measured = []

    def measure() -> SpanThroughput:
        measured.append(1)
        return SpanThroughput(inference_rps=10.0 * len(measured), forward_tps=100.0)

    first, second = labels
    for value in (first, second, second, first):
        cached_throughput(spans[value], f"fp-{setting}", quant, measure)
    assert len(measured) == 2  # once per kernel, then from the cache
