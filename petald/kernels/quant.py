"""Weight-only quantization of a block's linear layers: none, int8, int4 (CPU) and nf4 (CUDA).

Activations are never quantized to integers. The CPU kernels take bfloat16
activations: the matmul input is rounded to bfloat16 and the output brought back
to the compute dtype; everything around the matmuls (norms, rotary, attention,
residuals, the KV cache) stays in the compute dtype.

- ``int8`` on CPU: symmetric per-output-channel scales; petald's own kernel
  (``kernels/native/int8_native.py``: AVX512F or AVX2 with FMA, float32 activations) where it
  builds and measures faster, else torch's ``_weight_int8pack_mm`` (its float32-activation path
  is a scalar loop, 10-100x slower, which is why activations go to it as bfloat16).
- ``int4`` on CPU: asymmetric, groups of ``INT4_GROUP`` along the input
  dimension; petald's own kernel (``kernels/native/int4_native.py``: AVX512-BF16 or
  AVX2 with FMA) where it builds and measures faster, else torch's ``_weight_int4pack_mm_for_cpu``.
- ``none`` in bfloat16 on a CPU with native bfloat16 dot products (AVX512-BF16, AMX):
  the weights are reordered once into oneDNN's own blocked layout
  (``PrepackedBf16Linear``), not quantized.
- On CUDA, ``int8`` (LLM.int8, outlier threshold 6.0) and ``nf4`` go through
  bitsandbytes, imported only there; it is not a dependency of petald.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import time
from collections.abc import Callable

import torch

from petald.kernels.native import int4_native, int8_native
from petald.kernels.native.native_library import (
    PROCESS_LIBRARY,
    ChosenKernel,
    NativeLibrary,
    cpu_kernel_setting,
    native_bfloat16_view,
)
from petald.vocabulary import QUANT_MODES

log = logging.getLogger(__name__)

INT4_GROUP = 32
INT4_TILE = int4_native.TILE  # output rows per tile: torch's int4 kernel needs whole tiles of 16 too

Linear = Callable[[torch.Tensor], torch.Tensor]


class QuantError(ValueError):
    """A quantization mode this device or installation cannot run."""


def check_quant(quant: str, device: torch.device) -> None:
    """Refuse, before any weight is loaded, a mode this device cannot run (or an unknown ``PETALD_CPU_KERNELS``)."""
    if device.type == "cpu":
        cpu_kernel_setting()
    if quant not in QUANT_MODES:
        raise QuantError(f"unknown --quant {quant!r}: use one of {', '.join(QUANT_MODES)}")
    if quant == "nf4" and device.type != "cuda":
        raise QuantError("--quant nf4 needs a CUDA device and bitsandbytes (pip install bitsandbytes); "
                         "on CPU use --quant int8 or int4")
    if quant == "int4" and device.type != "cpu":
        raise QuantError("--quant int4 is the CPU kernel; on CUDA use --quant nf4 (bitsandbytes)")
    if quant in ("int8", "nf4") and device.type == "cuda":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise QuantError(f"--quant {quant} on CUDA needs bitsandbytes: pip install bitsandbytes") from None


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quant: str, dtype: torch.dtype,
                device: torch.device) -> Linear:
    """A callable computing ``x @ weight.T + bias`` with ``weight`` [out, in] stored as ``quant`` asks."""
    if quant == "none":
        if dtype == torch.bfloat16 and device.type == "cpu" and native_bfloat16_matmul():
            return PrepackedBf16Linear(weight, _bias(bias, dtype, device))
        return DenseLinear(weight.to(device, dtype), _bias(bias, dtype, device))
    if device.type == "cuda":
        return _bitsandbytes_linear(weight, bias, quant, dtype, device)
    if quant == "int8":
        return Int8Linear(weight, _bias(bias, dtype, device))
    if quant == "int4":
        return Int4Linear(weight, _bias(bias, dtype, device))
    check_quant(quant, device)
    raise QuantError(f"--quant {quant} is not available on {device}")


def _bias(bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    return None if bias is None else bias.to(device, dtype).contiguous()


class DenseLinear:
    """Plain weights, stored transposed ([in, out], contiguous).

    On CPU, MKL multiplies a few rows by an [in, out] matrix much faster than by the
    transpose of an [out, in] one (what ``F.linear`` does): with 1 thread, one token through
    SmolLM2's 30 blocks' float32 matmuls took 35-38 ms against 45 ms, and its LM head 6.2 ms
    against 10.8 ms; at 16 rows both layouts cost the same (decisions.md, "What the executor-speed
    work changed").
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight_t, self.bias = weight.t().contiguous(), bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = torch.mm(flat, self.weight_t) if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
        return y.view(*x.shape[:-1], -1)


@functools.cache
def onednn_bf16_supported() -> bool:
    """Whether oneDNN runs bfloat16 matmuls natively on this CPU (AVX512-BF16 or AMX), and this torch
    still has the private ops ``PrepackedBf16Linear`` calls (else the plain weights serve, slower)."""
    ops = ("_is_mkldnn_bf16_supported", "_reorder_linear_weight", "_linear_pointwise")
    if not torch.backends.mkldnn.is_available() or not all(hasattr(torch.ops.mkldnn, op) for op in ops):
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def native_bfloat16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 natively (``onednn_bf16_supported``), unless
    ``PETALD_CPU_KERNELS=avx2`` makes it act as one without. Where it does not, bfloat16 weights and
    activations run slower than float32 ones (1.3-3.4x, benchmarks.md): ``--dtype bfloat16`` and
    ``--head-quant bf16`` fall back to float32 there (``dtypes.resolve_dtype``, ``ClientHead``)."""
    return native_bfloat16_view() and onednn_bf16_supported()


class _FrozenKernelMatmul(torch.autograd.Function):
    """``layer.matmul(x)`` for weights held in a kernel's own format, under autograd: those kernels
    have no derivative, and the weights never train, so backward returns only the input's
    gradient, through a plain copy of the weights (made for that one call, so the layer keeps
    its own format in memory)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: _KernelLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight = ctx.layer.dense_weight().to(grad.dtype)  # [out, in]
        return grad.reshape(-1, grad.shape[-1]).mm(weight).view(*grad.shape[:-1], -1), None


class _KernelLinear:
    """A frozen linear layer whose weights only its own kernel can read (quantized or prepacked)."""

    bias: torch.Tensor | None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The weights as a plain [out, in] tensor: what ``matmul`` multiplies by."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            y = _FrozenKernelMatmul.apply(x, self)  # a training forward (kernels/training_forward.py)
        else:
            y = self.matmul(x)
        return y if self.bias is None else y + self.bias


class Int8Linear(_KernelLinear):
    """Per-output-channel symmetric int8 weights: w ~= q * scale, q in [-127, 127].

    Served by petald's own kernel (``kernels/native/int8_native.py``: float32 activations) where it
    builds, the CPU runs one of its variants, the layer's outputs come in whole tiles of 16, and it
    measured faster than torch's ``_weight_int8pack_mm`` (bfloat16 activations) at a decode step
    (``native_enabled``); ``native`` forces the choice as for ``Int4Linear``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, native: bool | None = None,
                 library: NativeLibrary = PROCESS_LIBRARY):
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)
        self.bias = bias
        tiled = weight.shape[0] % int8_native.TILE == 0
        if native is None:
            native = tiled and native_enabled("int8", library)
        elif native and not tiled:
            raise QuantError(f"petald's int8 kernel needs output widths divisible by {int8_native.TILE}")
        self.kernel = int8_native.int8_kernel(library) if native else None
        if native and self.kernel is None:
            raise QuantError("petald's int8 kernel is not available here (see the log for why)")
        self.native = native
        # The kernel multiplies by the same bfloat16-rounded scales torch's does: one set of weights.
        self.packed = int8_native.pack(self.q, self.scale) if self.kernel is not None else None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.kernel is not None:
            y = int8_native.matmul(flat, self.packed, self.kernel).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), self.q, self.scale).to(x.dtype)
        return y.view(*x.shape[:-1], self.q.shape[0])

    def dense_weight(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]


def native_faster_at(threads: int, kind: str = "int4") -> bool:
    """Whether petald's ``kind`` kernel (int4 or int8; the variant chosen for this CPU), on one thread,
    multiplies one row by a 3072 x 576 layer (SmolLM2's gate/up) faster than torch's kernel does on
    ``threads`` threads; measured once per process, kind and thread count, ~0.1 s with quantizing the
    layer for both. int4 here (2 cores): 2.1x faster with 1 thread and 1.3x with 2; on a CPU with many
    cores torch's multi-threaded kernel may win at decode sizes, and then keeps serving. Only one row
    is timed, though steps of 2-15 rows (a few sessions batched) also run on one thread: here, with 2
    threads, the int4 margin is largest at one row (1.37x) and smallest at 8 (1.07x), so a many-core
    CPU may prefer torch's kernel for those first."""
    kernel = _NATIVE_KERNELS[kind]()
    return kernel is not None and _native_faster_at(kind, threads, kernel.isa)


@functools.cache
def _native_faster_at(kind: str, threads: int, isa: str) -> bool:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3072, 576, generator=gen)
    layer = Int4Linear if kind == "int4" else Int8Linear
    kernels = {"torch": layer(weight, None, native=False), "petald": layer(weight, None, native=True)}
    x = torch.randn(1, 576, generator=gen)
    timings: dict[str, list[float]] = {name: [] for name in kernels}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i in range(25):
            for name, linear in kernels.items():
                t0 = time.perf_counter()
                linear.matmul(x)
                if i >= 5:  # after warm-up
                    timings[name].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    ours, theirs = statistics.median(timings["petald"]), statistics.median(timings["torch"])
    log.info("%s kernels at one row, %d thread(s): petald's %s %.0f us, torch's %.0f us: using %s", kind, threads,
             isa, ours * 1e6, theirs * 1e6, "petald's" if ours <= theirs else "torch's")
    return ours <= theirs


def native_enabled(kind: str, library: NativeLibrary = PROCESS_LIBRARY,
                   faster_at: Callable[[int], bool] | None = None) -> bool:
    """Whether new ``Int4Linear`` (``kind`` "int4") or ``Int8Linear`` ("int8") layers use petald's kernel
    (``kernels/native/int4_native.py``, ``int8_native.py``): it is built (in ``library``), runs on this
    CPU, and (unless ``PETALD_NATIVE_INT4=1`` / ``PETALD_NATIVE_INT8=1`` insists) it beats torch's kernel
    at a decode step with torch's thread count (``faster_at(threads)``, default ``native_faster_at``).
    ``=0`` keeps torch's kernel."""
    setting = os.environ.get(f"PETALD_NATIVE_{kind.upper()}", "auto")
    if setting == "0" or _NATIVE_KERNELS[kind](library) is None:
        return False
    if setting == "1":
        return True
    return faster_at(torch.get_num_threads()) if faster_at else native_faster_at(torch.get_num_threads(), kind)


def native_int4_enabled(library: NativeLibrary = PROCESS_LIBRARY,
                        faster_at: Callable[[int], bool] = native_faster_at) -> bool:
    """``native_enabled("int4", ...)``: whether new ``Int4Linear`` layers use petald's kernel."""
    return native_enabled("int4", library, faster_at)


_NATIVE_KERNELS: dict[str, Callable[..., ChosenKernel | None]] = {
    "int4": int4_native.int4_kernel, "int8": int8_native.int8_kernel}


class Int4Linear(_KernelLinear):
    """Asymmetric int4 weights in groups along the input dimension: w ~= (q - 8) * scale + zero.

    Served by petald's own kernel (``kernels/native/int4_native.py``) where it builds, the CPU runs
    one of its variants and it measured faster than torch's at a decode step (``native_int4_enabled``),
    else by torch's ``_weight_int4pack_mm_for_cpu``; ``native`` forces the choice (False: torch's
    kernel; True: petald's, which must be available). petald's kernel is ``library``'s (the process's
    own unless told); ``kernel`` is its variant, None for torch's. The weights are held in one kernel's
    layout only.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: int = INT4_GROUP,
                 native: bool | None = None, library: NativeLibrary = PROCESS_LIBRARY):
        out_features, in_features = weight.shape
        if in_features % group:
            raise QuantError(f"--quant int4 needs input widths divisible by {group}; this model has a layer "
                             f"of width {in_features}")
        if out_features % INT4_TILE:  # both kernels' tiles
            raise QuantError(f"--quant int4 needs output widths divisible by {INT4_TILE}; this model has a layer "
                             f"of {out_features} outputs")
        w = weight.float().reshape(out_features, in_features // group, group)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = ((w - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
        zero = lo + 8 * scale  # the kernels compute (q - 8) * scale + zero
        scale, zero = scale.squeeze(-1).t().to(torch.bfloat16), zero.squeeze(-1).t().to(torch.bfloat16)  # [G, N]
        if native is None:
            native = native_int4_enabled(library) and group == int4_native.GROUP
        elif native and group != int4_native.GROUP:
            raise QuantError(f"petald's int4 kernel takes groups of {int4_native.GROUP}, not {group}")
        self.kernel = int4_native.int4_kernel(library) if native else None
        if native and self.kernel is None:
            raise QuantError("petald's int4 kernel is not available here (see the log for why)")
        self.native = native
        if self.kernel is not None:
            self.packed = int4_native.pack(q, scale, zero, self.kernel.isa)
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            self.scale_zero = torch.stack([scale, zero], dim=-1).contiguous()
        self.group, self.bias = group, bias
        self.in_features, self.out_features = in_features, out_features

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.kernel is not None:
            y = int4_native.matmul(flat, self.packed, self.kernel)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), self.packed, self.group,
                                                           self.scale_zero)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        # The packed layouts are the kernels' own: let the kernel unpack them, by multiplying the identity.
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        if self.kernel is not None:
            return int4_native.matmul(eye, self.packed, self.kernel).t()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scale_zero).t().float()


class PrepackedBf16Linear(_KernelLinear):
    """bfloat16 weights reordered once into oneDNN's blocked layout, multiplied by oneDNN directly.

    ``F.linear`` on plain bfloat16 weights reorders them on every call; prepacked, SmolLM2's 30
    blocks' matmuls on one core took 16.7 ms for one token against 26.5 (and 26.8 for float32's
    transposed layout), and 24 ms for 16 tokens against 40 (float32: 72-80): decisions.md,
    "bfloat16 on CPU". The output is bit-identical to ``F.linear``'s. oneDNN's reordered
    tensors have no autograd formula, hence the ``_KernelLinear`` path for training.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16).contiguous(), 1)
        self.bias = None
        self._bias = bias  # added by the kernel itself in matmul

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self._bias, "none", [], "")

    def dense_weight(self) -> torch.Tensor:
        return self.packed.to_dense()


def _bitsandbytes_linear(weight: torch.Tensor, bias: torch.Tensor | None, quant: str, dtype: torch.dtype,
                         device: torch.device) -> Linear:
    """int8 (LLM.int8) or nf4 through bitsandbytes on CUDA: its modules quantize on the move to the GPU."""
    check_quant(quant, device)
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    w = weight.to(dtype).contiguous()
    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                    threshold=6.0)
        layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=dtype,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.to(dtype), requires_grad=False)
    layer = layer.to(device).eval()
    return layer
