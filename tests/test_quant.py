"""Weight-only quantization: the kernels against their own dequantized weights, the real model's
top-1 agreement with float32 on a reference text, and the mode a server announces."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from petald.kernels import quant
from petald.kernels.client_head import ClientHead
from petald.kernels.dtypes import resolve_dtype
from petald.kernels.native import int4_native, int8_native
from petald.kernels.native.decode_attention import decode_attention_kernel
from petald.kernels.native.native_library import (
    ChosenKernel,
    CpuKernelError,
    NativeKernelError,
    NativeLibrary,
)
from petald.kernels.native.tile_threads import SPLIT_ROWS
from petald.kernels.quant import (
    INT4_GROUP,
    DenseLinear,
    Int4Linear,
    Int8Linear,
    PrepackedBf16Linear,
    QuantError,
    check_quant,
    make_linear,
    onednn_bf16_supported,
)
from petald.kernels.quant_choice import REFERENCE_TEXT
from petald.kernels.sources.open_source import open_source
from petald.kernels.span import BlockSpan
from petald.protocol.messages import ServerInfo
from tests.test_cli import run_petald
from tests.tiny_models import TINY_BLOCKS, TINY_MODELS

CPU = torch.device("cpu")


def test_int8_is_per_channel_weights_times_bfloat16_activations():
    gen = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(96, 128, generator=gen), torch.randn(96, generator=gen), torch.randn(2, 5, 128, generator=gen)
    layer = Int8Linear(w, b)
    assert layer.q.dtype == torch.int8 and layer.q.abs().max() == 127
    dequant = layer.q.float() * layer.scale.float()[:, None]
    assert (dequant - w).abs().max() <= layer.scale.float().max() * 0.51 + 1e-2  # within half a step
    want = F.linear(x.bfloat16().float(), dequant, b)
    torch.testing.assert_close(layer(x), want, atol=0.1, rtol=0.02)


def test_int4_is_grouped_weights_times_bfloat16_activations():
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(64, 4 * INT4_GROUP, generator=gen), torch.randn(3, 4 * INT4_GROUP, generator=gen)
    layer = Int4Linear(w, None)
    q = w.reshape(64, 4, INT4_GROUP)
    lo, hi = q.amin(-1, keepdim=True), q.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    dequant = (((q - lo) / step).round() * step + lo).reshape(64, -1)
    torch.testing.assert_close(layer(x), F.linear(x.bfloat16().float(), dequant), atol=0.2, rtol=0.02)
    with pytest.raises(QuantError, match="divisible"):
        Int4Linear(torch.randn(8, INT4_GROUP + 1), None)


def _int4_reference(w: torch.Tensor) -> torch.Tensor:
    """The weights ``Int4Linear`` holds, computed here independently of both kernels' layouts."""
    g = w.reshape(w.shape[0], -1, INT4_GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((g - lo) / scale).round().clamp(0, 15)
    zero = lo + 8 * scale
    return ((q - 8) * scale.bfloat16().float() + zero.bfloat16().float()).reshape(w.shape)


def _native_kernel_or_skip(kind: str, choose, needs: str) -> ChosenKernel:
    """The ``kind`` kernel of the set PETALD_CPU_KERNELS forces (else this CPU's best), or a skip saying why not."""
    try:
        kernel = choose()
    except CpuKernelError as exc:
        pytest.skip(str(exc))
    if kernel is None:
        pytest.skip(f"petald's {kind} kernel needs a C compiler and a CPU with {needs}")
    return kernel


def _skip_without_native_int4() -> ChosenKernel:
    return _native_kernel_or_skip("int4", int4_native.int4_kernel, "AVX512-BF16 or AVX2 and FMA")


def test_native_int4_kernel_multiplies_the_weights_int4linear_holds(cpu_kernels):
    """Every row count the kernel unrolls separately (1-8) and past it, against weights computed
    without either kernel: a wrong nibble, tile or group order cannot hide in a shared unpacking."""
    assert _skip_without_native_int4().isa == cpu_kernels
    gen = torch.Generator().manual_seed(7)
    for out_features, in_features in ((48, 2 * INT4_GROUP), (32, 5 * INT4_GROUP)):
        w, b = torch.randn(out_features, in_features, generator=gen), torch.randn(out_features, generator=gen)
        layer = Int4Linear(w, b, native=True)
        assert layer.native and layer.kernel.isa == cpu_kernels
        want_w = _int4_reference(w)
        torch.testing.assert_close(layer.dense_weight(), want_w, atol=1e-6, rtol=1e-6)
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 40):
            x = torch.randn(rows, in_features, generator=gen)
            torch.testing.assert_close(layer(x), x.bfloat16().float() @ want_w.t() + b, atol=1e-4, rtol=1e-5)
        # Torch's kernel holds the same weights: the same products, up to its bfloat16 rounding.
        x = torch.randn(2, 3, in_features, generator=gen)
        torch.testing.assert_close(layer(x), Int4Linear(w, b, native=False)(x), atol=0.1, rtol=0.02)
        got = Int4Linear(w, None, native=True)(x.bfloat16())  # a bfloat16 block's layer (its bias would be bfloat16)
        assert got.dtype == torch.bfloat16 and got.shape == (2, 3, out_features)
        assert layer(torch.empty(0, in_features)).shape == (0, out_features)


def test_native_int8_kernel_multiplies_the_weights_int8linear_holds(cpu_kernels):
    """Every row count the kernel unrolls separately (1-4) and past it, split over threads too, against
    the layer's own dequantized weights in float64: float32 activations, only accumulation rounds."""
    assert _native_kernel_or_skip("int8", int8_native.int8_kernel, "AVX512F or AVX2 and FMA").isa == cpu_kernels
    gen = torch.Generator().manual_seed(9)
    w, b = torch.randn(48, 80, generator=gen), torch.randn(48, generator=gen)
    layer = Int8Linear(w, b, native=True)
    assert layer.native and layer.kernel.isa == cpu_kernels
    want_w = layer.dense_weight().double()
    threads = torch.get_num_threads()
    try:
        for rows, split in ((1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (9, 1), (SPLIT_ROWS + 3, 3)):
            torch.set_num_threads(split)
            x = torch.randn(rows, 80, generator=gen)
            want = (x.double() @ want_w.t() + b.double()).float()
            torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)
    # torch's kernel holds the same weights: the same products up to its bfloat16 activations.
    x = torch.randn(2, 3, 80, generator=gen)
    torch.testing.assert_close(layer(x), Int8Linear(w, b, native=False)(x), atol=0.1, rtol=0.02)
    assert layer(torch.empty(0, 80)).shape == (0, 48)
    with pytest.raises(NativeKernelError, match="rows of width 80"):
        int8_native.matmul(torch.randn(2, 96), layer.packed, layer.kernel)
    with pytest.raises(QuantError, match="divisible by 16"):
        Int8Linear(torch.randn(20, 80), None, native=True)
    assert not Int8Linear(torch.randn(20, 80), None).native  # untiled widths keep torch's kernel


def test_native_int4_kernel_splits_large_products_over_threads_and_refuses_wrong_inputs(cpu_kernels):
    _skip_without_native_int4()
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(64, 3 * INT4_GROUP, generator=gen)
    layer = Int4Linear(w, None, native=True)
    x = torch.randn(SPLIT_ROWS + 3, 3 * INT4_GROUP, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = layer(x)
        torch.set_num_threads(3)  # 4 tiles over 3 threads: uneven parts
        split = layer(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, split)
    torch.testing.assert_close(alone, x.bfloat16().float() @ _int4_reference(w).t(), atol=1e-4, rtol=1e-5)
    for bad in (torch.randn(2, 4 * INT4_GROUP), torch.randn(2, 2 * INT4_GROUP), torch.randn(3 * INT4_GROUP)):
        with pytest.raises(NativeKernelError, match="rows of width 96"):
            int4_native.matmul(bad, layer.packed, layer.kernel)
    with pytest.raises(QuantError, match="groups of 32"):
        Int4Linear(torch.randn(16, 128), None, group=64, native=True)


def test_a_corrupt_cached_int4_kernel_is_built_again(tmp_path):
    """In fresh processes: this one has the library mapped, and overwriting a mapped file crashes it."""
    _skip_without_native_int4()
    env = {k: v for k, v in os.environ.items() if k != "PETALD_NATIVE_INT4"} | {"PETALD_CACHE_DIR": str(tmp_path)}
    probe = [sys.executable, "-c", "from petald.kernels.native import int4_native; print(int4_native.native_int4_available())"]
    assert subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip() == "True"
    (built,) = (tmp_path / "native").glob("*.so")
    built.write_bytes(b"not a shared library")
    assert subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip() == "True"
    assert built.read_bytes().startswith(b"\x7fELF")


def test_int4_layers_take_the_kernel_that_measured_faster_unless_told(monkeypatch):
    _skip_without_native_int4()
    monkeypatch.delenv("PETALD_NATIVE_INT4", raising=False)
    w = torch.randn(32, 2 * INT4_GROUP)
    threads = torch.get_num_threads()
    assert quant.native_int4_enabled() == quant.native_faster_at(threads)
    assert Int4Linear(w, None).native == quant.native_faster_at(threads)
    asked: list[int] = []

    def torch_faster(threads: int) -> bool:  # as on a many-core CPU
        asked.append(threads)
        return False

    assert not quant.native_int4_enabled(faster_at=torch_faster) and asked == [threads]
    assert quant.native_int4_enabled(faster_at=lambda threads: True)
    monkeypatch.setenv("PETALD_NATIVE_INT4", "1")
    assert quant.native_int4_enabled(faster_at=torch_faster) and Int4Linear(w, None).native
    assert asked == [threads]  # insisting skips the timing


def test_the_int4_variants_agree_on_inputs_of_every_sign_and_size(monkeypatch):
    """AVX2's sums q x and subtracts 8 x once per group where AVX512's sums (q - 8) x: on a layer of
    SmolLM2's size with inputs far from zero, the two stay within float32 rounding of each other."""
    gen = torch.Generator().manual_seed(9)
    w, x = torch.randn(3072, 576, generator=gen) * 0.02, torch.randn(5, 576, generator=gen) * 10 + 3
    outputs = {}
    for isa in ("avx512", "avx2"):
        monkeypatch.setenv("PETALD_CPU_KERNELS", isa)
        _skip_without_native_int4()
        outputs[isa] = Int4Linear(w, None, native=True)(x)
    want = x.bfloat16().double() @ _int4_reference(w).double().t()
    for got in outputs.values():
        torch.testing.assert_close(got.double(), want, atol=2e-4 * want.abs().max().item(), rtol=0)


def test_cpu_kernel_sets_are_chosen_by_the_cpus_features_or_the_switch(monkeypatch):
    """One place decides: the best set this CPU (here: an injected view of one) runs; PETALD_CPU_KERNELS
    forces one, and naming a set the CPU lacks, or none at all, is an error that says what to do."""
    library = NativeLibrary()
    if library.load() is None:
        pytest.skip("petald's C kernels need a C compiler")
    views = {"avx512 with bfloat16": ({"avx2", "fma", "avx512f", "avx512bw", "avx512bf16"}, "avx512", "avx512"),
             "avx512 without bfloat16": ({"avx2", "fma", "avx512f", "avx512bw"}, "avx2", "avx512"),
             "avx2 only": ({"avx2", "fma"}, "avx2", "avx2"), "older": ({"avx2"}, None, None)}
    for name, (features, int4, attention) in views.items():
        view = NativeLibrary(features=frozenset(features))  # the same build, from the cache: only the view differs
        chosen = int4_native.int4_kernel(view), decode_attention_kernel(torch.float32, CPU, 64, view)
        assert tuple(k and k.isa for k in chosen) == (int4, attention), name
    avx2_only = NativeLibrary(features=frozenset({"avx2", "fma"}))
    monkeypatch.setenv("PETALD_CPU_KERNELS", "avx512")
    with pytest.raises(CpuKernelError, match="PETALD_CPU_KERNELS=avx512: .*needs avx512bf16, avx512bw, avx512f"):
        int4_native.int4_kernel(avx2_only)
    monkeypatch.setenv("PETALD_CPU_KERNELS", "torch")
    assert int4_native.int4_kernel(library) is None and not Int4Linear(torch.randn(16, 32), None).native
    monkeypatch.setenv("PETALD_CPU_KERNELS", "sse9")
    with pytest.raises(CpuKernelError, match="'sse9' is not a kernel set: use one of auto, avx512, avx2, torch"):
        Int4Linear(torch.randn(16, 32), None)


def test_int4_refuses_layers_neither_kernel_can_tile():
    with pytest.raises(QuantError, match="output widths divisible by 16"):
        Int4Linear(torch.randn(40, 2 * INT4_GROUP), None)  # 40 outputs: not whole 16-row tiles


def test_int4_falls_back_to_torchs_kernel_without_a_compiler_or_when_told(monkeypatch, tmp_path):
    w, x = torch.randn(32, 2 * INT4_GROUP), torch.randn(3, 2 * INT4_GROUP)
    monkeypatch.delenv("PETALD_NATIVE_INT4", raising=False)  # petald's kernel wherever it builds
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    unbuilt = NativeLibrary(cache_dir=tmp_path)  # nothing built there yet
    assert not int4_native.native_int4_available(unbuilt)
    assert not quant.native_int4_enabled(unbuilt, faster_at=lambda threads: True)
    want = x.bfloat16().float() @ _int4_reference(w).t()
    layer = Int4Linear(w, None, library=unbuilt)  # the default choice, where no kernel builds
    assert not layer.native
    torch.testing.assert_close(layer(x), want, atol=0.1, rtol=0.02)
    monkeypatch.setenv("PETALD_NATIVE_INT4", "1")  # insisting builds no kernel
    assert not quant.native_int4_enabled(unbuilt)
    layer = Int4Linear(w, None, library=unbuilt)
    assert not layer.native
    torch.testing.assert_close(layer(x), want, atol=0.1, rtol=0.02)
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PETALD_NATIVE_INT4", "0")
    assert not quant.native_int4_enabled() and not Int4Linear(w, None).native


needs_onednn_bf16 = pytest.mark.skipif(not onednn_bf16_supported(),
                                       reason="this CPU has no native bfloat16 dot products for oneDNN")


@needs_onednn_bf16
def test_prepacked_bfloat16_is_bit_identical_to_plain_bfloat16():
    gen = torch.Generator().manual_seed(4)
    w, b = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen).bfloat16()
    for bias in (None, b):
        layer = PrepackedBf16Linear(w, bias)
        assert torch.equal(layer.dense_weight(), w.bfloat16())
        for shape in ((1, 64), (16, 64), (2, 3, 64)):
            x = torch.randn(*shape, generator=gen).bfloat16()
            got = layer(x)
            assert got.dtype == torch.bfloat16 and got.shape == (*shape[:-1], 96)
            assert torch.equal(got, F.linear(x, w.bfloat16(), bias))
    # A strided input (a slice of a wider tensor, as the block's activations are) reads the same.
    x = torch.randn(4, 128, generator=gen).bfloat16()[:, ::2]
    assert torch.equal(layer(x), F.linear(x, w.bfloat16(), b))


def test_dense_bfloat16_layers_are_prepacked_only_where_onednn_runs_bfloat16():
    w = torch.randn(32, 16)
    layer = make_linear(w, None, "none", torch.bfloat16, CPU)
    assert isinstance(layer, PrepackedBf16Linear if onednn_bf16_supported() else DenseLinear)
    assert isinstance(make_linear(w, None, "none", torch.float32, CPU), DenseLinear)


def test_bfloat16_settings_fall_back_to_float32_with_one_warning_where_bfloat16_is_not_native(
        tiny_models, monkeypatch, caplog):
    """--head-quant bf16 and --dtype bfloat16 on a CPU without native bfloat16 (this one acting as an AVX2-only
    CPU, PETALD_CPU_KERNELS=avx2) would be slower than float32: they run float32, and say so once each."""
    source = open_source(str(tiny_models["llama"]))
    hidden = torch.randn(2, 3, source.config.hidden_size)
    reference = ClientHead(source, quant="none")
    monkeypatch.setenv("PETALD_CPU_KERNELS", "avx2")
    assert not quant.native_bfloat16_matmul()
    with caplog.at_level("WARNING"):
        head = ClientHead(source, quant="bf16")
        dtype = resolve_dtype("bfloat16", CPU)
    assert head.quant == "none" and head.head_dtype == torch.float32 and isinstance(head.lm_head, DenseLinear)
    assert torch.equal(head.logits(hidden), reference.logits(hidden))
    assert dtype == torch.float32 and resolve_dtype("float16", CPU) == torch.float16
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("no native bfloat16 matmul" in w and "float32" in w for w in warnings)
    assert isinstance(make_linear(torch.randn(32, 16), None, "none", torch.bfloat16, CPU), DenseLinear)
    monkeypatch.delenv("PETALD_CPU_KERNELS")
    native = onednn_bf16_supported()  # this CPU's own answer: bfloat16 stays where it is native
    assert (ClientHead(source, quant="bf16").head_dtype == torch.bfloat16) == native
    assert (resolve_dtype("bfloat16", CPU) == torch.bfloat16) == native


def test_nf4_and_unknown_modes_are_refused_on_cpu():
    with pytest.raises(QuantError, match="needs a CUDA device and bitsandbytes"):
        check_quant("nf4", CPU)
    with pytest.raises(QuantError, match="unknown --quant"):
        check_quant("int3", CPU)


def test_serve_quant_nf4_on_cpu_is_a_clear_cli_error(tiny_models):
    result = run_petald("serve", "--blocks", "0:6", "--quant", "nf4", "--device", "cpu", "--new-swarm",
                        "--model", str(tiny_models["llama"]))
    assert result.returncode == 1
    assert "nf4 needs a CUDA device and bitsandbytes" in result.stderr and "Traceback" not in result.stderr


def test_an_unknown_cpu_kernel_set_is_a_clear_cli_error_before_loading(tiny_models):
    result = run_petald("serve", "--blocks", "0:6", "--quant", "int4", "--device", "cpu", "--new-swarm",
                        "--model", str(tiny_models["llama"]), env=os.environ | {"PETALD_CPU_KERNELS": "avx3"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "PETALD_CPU_KERNELS='avx3' is not a kernel set: use one of auto, avx512, avx2, torch" in result.stderr


def test_server_info_carries_quant_and_reads_older_servers_as_none():
    info = ServerInfo("m@1", "f" * 64, 30, 0, 15, "float32", 576, 8192, 100, "0.1.0", quant="int8")
    assert ServerInfo.from_wire(info.to_wire()).quant == "int8"
    older = {k: v for k, v in info.to_wire().items() if k != "quant"}
    assert ServerInfo.from_wire(older).quant == "none"


@pytest.fixture(scope="module")
def smollm2_on_text():
    """SmolLM2, its client head, the reference text's ids, float32's final hidden states and logits on
    them (computed once)."""
    source = open_source(None)
    head = ClientHead(source)
    ids = source.load_tokenizer()(REFERENCE_TEXT.read_text(), return_tensors="pt").input_ids
    hidden = _hidden(source, head, ids, "none")
    return source, head, ids, hidden, head.logits(hidden)[0]


def _hidden(source, head: ClientHead, ids: torch.Tensor, quant: str) -> torch.Tensor:
    span = BlockSpan(source, 0, 30, torch.float32, CPU, quant=quant)
    return span.forward(head.embed(ids), span.new_cache(1, ids.shape[1]))


def _logits(source, head: ClientHead, ids: torch.Tensor, quant: str) -> torch.Tensor:
    return head.logits(_hidden(source, head, ids, quant))[0]


@pytest.mark.parametrize("quant", ["int8", "int4", "int4:avx2"])
def test_quantized_smollm2_agrees_with_float32_on_a_reference_text(smollm2_on_text, quant, monkeypatch):
    """Top-1 agreement over every position of ~340 tokens of text (teacher-forced); "int4:avx2" through
    petald's AVX2 int4 kernel, whatever this CPU would choose."""
    source, head, ids, _, want = smollm2_on_text
    quant, _, kernels = quant.partition(":")
    if kernels:
        monkeypatch.setenv("PETALD_CPU_KERNELS", kernels)
        monkeypatch.setenv("PETALD_NATIVE_INT4", "1")
        assert _skip_without_native_int4().isa == kernels
    assert ids.shape[1] > 300
    got = _logits(source, head, ids, quant)
    agreement = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agreement >= 0.95, f"{quant}: top-1 agreement {agreement:.3f}"
    assert 0 < (got - want).abs().max() < 5  # quantized, yet close


def test_a_bfloat16_lm_head_agrees_with_float32_on_a_reference_text(smollm2_on_text):
    """The head's matrix in bfloat16 (prepacked where oneDNN runs bfloat16), the same float32 hidden states."""
    source, _, ids, hidden, want = smollm2_on_text
    head = ClientHead(source, quant="bf16")
    got = head.logits(hidden)[0]
    assert got.dtype == torch.float32
    agreement = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agreement >= 0.95, f"bf16 head: top-1 agreement {agreement:.3f}"
    assert 0 < (got - want).abs().max() < 1


def test_a_bfloat16_lm_head_keeps_the_embeddings_and_norm_in_float32(tiny_models):
    source = open_source(str(tiny_models["llama"]))
    plain, bf16 = ClientHead(source), ClientHead(source, quant="bf16")
    ids = torch.randint(0, 320, (2, 5), generator=torch.Generator().manual_seed(3))
    assert bf16.embed_weight.dtype == torch.float32
    assert torch.equal(bf16.embed(ids), plain.embed(ids))  # not rounded with the head's matrix
    matrix = source.client_tensors()["lm_head.weight"].bfloat16()
    hidden = torch.randn(2, 5, source.config.hidden_size, generator=torch.Generator().manual_seed(4))
    normed = F.rms_norm(hidden, (hidden.shape[-1],), plain.norm_weight, plain.eps)
    want = F.linear(normed.bfloat16(), matrix).float()
    torch.testing.assert_close(bf16.logits(hidden), want, rtol=1e-2, atol=1e-2)
    # Trainable through it: the input's gradient is that of the bfloat16 matmul's.
    x = hidden.clone().requires_grad_()
    bf16.logits_with_grad(x).square().sum().backward()
    ref = hidden.clone().requires_grad_()
    normed = F.rms_norm(ref, (ref.shape[-1],), plain.norm_weight, plain.eps)
    F.linear(normed.bfloat16(), matrix).float().square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=2e-2, atol=2e-2)


def test_the_lm_head_refuses_modes_it_cannot_run_here(tiny_models):
    source = open_source(str(tiny_models["llama"]))
    with pytest.raises(QuantError, match="unknown head quantization 'fp8'"):
        ClientHead(source, quant="fp8")
    with pytest.raises(QuantError, match="the LM head cannot be stored as nf4"):
        ClientHead(source, quant="nf4")


@pytest.mark.slow
def test_a_quantized_server_announces_its_mode_and_serves_what_its_span_computes(tiny_models):
    from petald.cli.local_swarm import LocalSwarm
    from petald.p2pnode.client.distributed_model import DistributedModel

    path = str(tiny_models["llama"])
    source = open_source(path)
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(4))
    span, head = BlockSpan(source, 0, 6, torch.float32, CPU, quant="int8"), ClientHead(source)
    cache, want, nxt = span.new_cache(1, 18), [], ids
    for _ in range(8):
        nxt = head.logits(span.forward(head.embed(nxt), cache)[:, -1:]).argmax(-1)
        want.append(int(nxt[0, 0]))
    with LocalSwarm(["0:6"], model=path, extra_args=["--threads", "1", "--quant", "int8"]) as swarm:
        assert "quant int8" in "\n".join(swarm.servers[0].output)
        with DistributedModel(swarm.addresses, path, wire="float32") as model:
            assert [s.info.quant for s in model.servers] == ["int8"]
            got = model.generate(ids, max_new_tokens=8, eos_token_id=[])[0, 10:].tolist()
    assert got == want


def test_every_quantization_mode_is_offered_by_the_cli_and_accepted_by_the_wire():
    """petald/vocabulary.py holds the modes once; the CLI's choices and the wire's check use that copy."""
    from click.testing import CliRunner

    from petald.cli.main import cli
    from petald.protocol.errors import ProtocolError
    from petald.protocol.messages import ServerInfo

    serve_help = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200).output
    generate_help = CliRunner().invoke(cli, ["generate", "--help"], terminal_width=200).output
    assert "[auto|none|int8|int4|nf4]" in serve_help and "[auto|none|int8|int4|nf4|bf16]" in generate_help
    info = ServerInfo("m@0", "ab", 30, 0, 30, "float32", 576, 2048, 100, "0.1.0")
    for mode in ("none", "int8", "int4", "nf4"):
        assert ServerInfo.from_wire({**info.to_wire(), "quant": mode}).quant == mode
    with pytest.raises(ProtocolError, match="quant"):
        ServerInfo.from_wire({**info.to_wire(), "quant": "int3"})


@pytest.mark.parametrize("name", TINY_MODELS)
def test_every_familys_quantized_blocks_agree_with_float32(tiny_models, name):
    """int8 and int4 blocks of each tiny model against its float32 blocks, top-1 over 60 teacher-forced
    positions. A random tiny model's logits have small margins, so agreement is far below a real
    model's (measured: int8 0.88-0.98, by petald's kernel or torch's, whichever timed faster; int4 0.47-0.65, Mixtral's 0.32, where int4's noise also flips
    which experts a token gets: 0.43-0.53 with every expert taken; SmolLM2 on real text is the test
    above); the bounds catch a family whose quantized projections are laid out wrong (fused Phi-3's, an
    expert's, say), whose agreement would fall to chance (1/320)."""
    source = open_source(str(tiny_models[name]))
    head = ClientHead(source)
    ids = torch.randint(0, 320, (1, 60), generator=torch.Generator().manual_seed(5))
    logits = {}
    for mode in ("none", "int8", "int4"):
        span = BlockSpan(source, 0, TINY_BLOCKS, torch.float32, CPU, quant=mode)
        logits[mode] = head.logits(span.forward(head.embed(ids), span.new_cache(1, 60)))[0]
    for mode, bound in (("int8", 0.75), ("int4", 0.25)):
        agreement = (logits[mode].argmax(-1) == logits["none"].argmax(-1)).float().mean().item()
        assert agreement >= bound, f"{name} {mode}: top-1 agreement {agreement:.2f}"
