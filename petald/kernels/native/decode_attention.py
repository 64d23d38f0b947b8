"""A decode step's rotary, cache write and attention in one C call per block (``decode_attention_body.h``,
built for AVX512F and for AVX2 with FMA: ``VARIANTS``, chosen by ``kernels/native/native_library.py``).

For single-token steps on CPU, ``StepBatch.attend`` hands a block's fused projection output to
``decode_attention`` instead of running rotary embedding, two ``index_copy_`` and a padded
``scaled_dot_product_attention`` over gathered keys: about fifteen torch ops whose overhead,
on a small model, costs several times their arithmetic (benchmarks.md, "Decode attention in
C"). The C kernel reads each session's keys and values where they lie in the pools, so there
is no gather, padding or mask. Prefill chunks, other devices and dtypes, head sizes that are not
a multiple of 16 and CPUs with neither AVX512F nor AVX2 and FMA keep the torch ops;
``PETALD_NATIVE_ATTENTION=0`` (or ``PETALD_CPU_KERNELS=torch``) keeps them everywhere.
"""

from __future__ import annotations

import os

import torch

from petald.kernels.native.native_library import (
    PROCESS_LIBRARY,
    ChosenKernel,
    NativeLibrary,
    Variant,
)

VARIANTS = (Variant("avx512", "petald_decode_attention_avx512", frozenset({"avx512f"})),
            Variant("avx2", "petald_decode_attention_avx2", frozenset({"avx2", "fma"})))
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # decode_attention.c's dtype codes


def decode_attention_kernel(dtype: torch.dtype, device: torch.device, head_dim: int,
                            library: NativeLibrary = PROCESS_LIBRARY) -> ChosenKernel | None:
    """The variant of the C kernel that runs decode steps of blocks of this dtype, device and head size
    (of ``library``: the process's own unless told), or None where torch's ops run them."""
    if os.environ.get("PETALD_NATIVE_ATTENTION", "1") == "0":
        return None
    if device.type != "cpu" or dtype not in _DTYPES or head_dim % 16:
        return None
    return library.choose("decode attention", VARIANTS)


def native_decode_attention_usable(dtype: torch.dtype, device: torch.device, head_dim: int,
                                   library: NativeLibrary = PROCESS_LIBRARY) -> bool:
    """Whether ``decode_attention_kernel`` finds a variant."""
    return decode_attention_kernel(dtype, device, head_dim, library) is not None


def decode_attention(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin_signed: torch.Tensor,
                     k_pool: torch.Tensor, v_pool: torch.Tensor, write_slots: torch.Tensor,
                     key_slots: torch.Tensor, lengths: torch.Tensor, window: int | None,
                     kernel: ChosenKernel | None = None) -> torch.Tensor:
    """Attention output [S, heads * head_dim] of S single-token steps, from their fused projections
    ``qkv`` [S, (heads + 2 kv_heads) * head_dim]: rotates the query and key heads by ``cos`` and
    ``sin_signed`` [S, head_dim] (``RotaryTable`` rows at each token's position), writes each key and
    value into the pools [slots, kv_heads, head_dim] at ``write_slots`` [S], and attends over the
    slots ``key_slots[s, :lengths[s]]`` (int64 [S, longest] and [S]), the last ``window`` of them
    where given, by ``kernel`` (``decode_attention_kernel``'s; by default the variant the process's library
    chooses). Call only where there is one. Tensors' dtypes and shapes are checked
    here, the sizes (lengths, head counts and size, window) by the C code before it writes anything; slot
    values are not, as the C code trusts them: ``StepBatch`` takes them from the pool's own page tables.
    """
    seqs, head_dim = qkv.shape[0], k_pool.shape[-1]
    kernel = kernel or PROCESS_LIBRARY.choose("decode attention", VARIANTS)
    if kernel is None:
        raise RuntimeError("petald's decode attention kernel is not loaded (see the log for why)")
    dtype = qkv.dtype
    for t in (qkv, cos, sin_signed, k_pool, v_pool):
        if t.dtype != dtype or not t.is_cpu or not t.is_contiguous():
            raise ValueError("decode attention takes contiguous CPU tensors of one dtype, float32 or bfloat16")
    for t in (write_slots, key_slots, lengths):
        if t.dtype != torch.int64 or not t.is_cpu or not t.is_contiguous():
            raise ValueError("decode attention takes contiguous CPU int64 slots and lengths")
    if dtype not in _DTYPES or qkv.shape != (seqs, (heads + 2 * kv_heads) * head_dim) \
            or cos.numel() != seqs * head_dim or sin_signed.numel() != seqs * head_dim \
            or k_pool.shape != v_pool.shape or k_pool.shape[1:] != (kv_heads, head_dim) \
            or write_slots.shape != (seqs,) or lengths.shape != (seqs,) or key_slots.dim() != 2 \
            or key_slots.shape[0] != seqs:
        raise ValueError(f"decode attention got shapes that do not fit together: qkv {list(qkv.shape)} of {dtype} for "
                         f"{heads}/{kv_heads} heads, pools {list(k_pool.shape)}, key slots {list(key_slots.shape)}")
    out = torch.empty(seqs, heads * head_dim, dtype=qkv.dtype)
    status = kernel.function(
        qkv.data_ptr(), _DTYPES[qkv.dtype], seqs, heads, kv_heads, head_dim, cos.data_ptr(), sin_signed.data_ptr(),
        k_pool.data_ptr(), v_pool.data_ptr(), write_slots.data_ptr(), key_slots.data_ptr(), key_slots.shape[1],
        lengths.data_ptr(), window or 0, out.data_ptr())
    if status == -2:
        raise ValueError(f"decode attention got sizes that do not fit: lengths outside [1, {key_slots.shape[1]}] "
                         f"(the key slots' width), {heads} heads over {kv_heads} key/value heads, head size "
                         f"{head_dim} (a multiple of 16), or a window below 0")
    if status != 0:
        raise MemoryError("the decode attention kernel could not allocate its scratch space")
    return out
