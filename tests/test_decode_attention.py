"""petald's C decode attention (kernels/native/decode_attention.c): rotary, cache write and attention of
single-token steps, against an independent reference and against the torch ops it replaces."""

from __future__ import annotations

import math

import pytest
import torch

from petald.kernels.native import decode_attention as da
from petald.kernels.native.native_library import ChosenKernel, CpuKernelError, NativeLibrary

CPU = torch.device("cpu")


def _skip_without_kernel() -> ChosenKernel:
    """The kernel of the set PETALD_CPU_KERNELS forces (else this CPU's best), or a skip saying why not."""
    try:
        kernel = da.decode_attention_kernel(torch.float32, CPU, 16)
    except CpuKernelError as exc:
        pytest.skip(str(exc))
    if kernel is None:
        pytest.skip("petald's decode attention needs a C compiler and a CPU with AVX512F or AVX2 and FMA")
    return kernel


def _reference(qkv, heads, kv_heads, cos, sin, k_pool, v_pool, write_slots, key_slots, lengths, window):
    """The same step in float64, written from the definitions: x cos + rotate_half(x) sin (``sin`` plain,
    not RotaryTable's sin_signed), then softmax(q k / sqrt(d)) v over each session's keys."""
    d = k_pool.shape[-1]
    k_pool, v_pool = k_pool.double().clone(), v_pool.double().clone()
    out = []
    for s in range(qkv.shape[0]):
        x = qkv[s].double().view(heads + 2 * kv_heads, d)
        c, sn = cos[s].double(), sin[s].double()
        half = d // 2
        qk = x[: heads + kv_heads]
        rotated = qk * c + torch.cat([-qk[:, half:], qk[:, :half]], -1) * sn
        k_pool[write_slots[s]] = rotated[heads:].to(k_pool.dtype)
        v_pool[write_slots[s]] = x[heads + kv_heads :]
        first = max(0, int(lengths[s]) - window) if window else 0
        keys = key_slots[s, first : int(lengths[s])]
        rows = []
        for h in range(heads):
            g = h // (heads // kv_heads)
            weights = torch.softmax(k_pool[keys, g] @ rotated[h] / math.sqrt(d), dim=0)
            rows.append(weights @ v_pool[keys, g])
        out.append(torch.cat(rows))
    return torch.stack(out), k_pool, v_pool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "window"), [(4, 2, 16, None), (9, 3, 64, None),
                                                                       (6, 6, 32, 5)])
def test_decode_attention_matches_an_independent_reference(cpu_kernels, dtype, heads, kv_heads, head_dim, window):
    """Three sessions of different lengths whose keys lie scattered over the pool; with a sliding window
    in one case. The new keys and values land in the pools, rotated as the definition says."""
    kernel = _skip_without_kernel()
    assert kernel.isa == cpu_kernels
    gen = torch.Generator().manual_seed(head_dim)
    lengths = torch.tensor([1, 19, 7])
    slots = 40
    order = torch.randperm(slots, generator=gen)  # session s owns a scattered run of slots
    key_slots = torch.full((3, 19), slots, dtype=torch.long)  # the rest: a slot no session owns
    taken = 0
    for s, n in enumerate(lengths.tolist()):
        key_slots[s, :n] = order[taken : taken + n]
        taken += n
    write_slots = key_slots[torch.arange(3), lengths - 1].contiguous()
    k_pool = torch.randn(slots + 1, kv_heads, head_dim, generator=gen).to(dtype)
    v_pool = torch.randn(slots + 1, kv_heads, head_dim, generator=gen).to(dtype)
    k_pool[slots] = v_pool[slots] = float("nan")  # never read
    qkv = torch.randn(3, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    angles = torch.rand(3, head_dim // 2, generator=gen) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    sin_signed = torch.cat([-angles.sin(), angles.sin()], -1).to(dtype)  # as RotaryTable keeps it
    want, want_k, want_v = _reference(qkv, heads, kv_heads, cos, sin, k_pool, v_pool, write_slots, key_slots,
                                      lengths, window)
    got = da.decode_attention(qkv, heads, kv_heads, cos, sin_signed, k_pool, v_pool, write_slots, key_slots, lengths,
                              window, kernel)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.03, "rtol": 0.02}
    assert got.dtype == dtype and got.shape == (3, heads * head_dim)
    torch.testing.assert_close(got.double(), want, **tolerance)
    written = write_slots.tolist()
    torch.testing.assert_close(k_pool[written].double(), want_k[written], **tolerance)
    torch.testing.assert_close(v_pool[written].double(), want_v[written], atol=0, rtol=0)
    assert k_pool[slots].isnan().all()  # nothing wrote the slot no session owns


def test_decode_attention_refuses_inputs_that_do_not_fit_and_writes_nothing(cpu_kernels):
    _skip_without_kernel()
    heads, kv_heads, d = 4, 2, 16
    qkv = torch.randn(2, (heads + 2 * kv_heads) * d)
    cos, sin = torch.ones(2, d), torch.zeros(2, d)
    k_pool, v_pool = torch.zeros(9, kv_heads, d), torch.zeros(9, kv_heads, d)
    write, keys, lengths = torch.tensor([0, 4]), torch.tensor([[0, 8], [3, 4]]), torch.tensor([1, 2])
    good = dict(qkv=qkv, heads=heads, kv_heads=kv_heads, cos=cos, sin_signed=sin, k_pool=k_pool, v_pool=v_pool,
                write_slots=write, key_slots=keys, lengths=lengths, window=None)
    bad = [{"qkv": qkv[:, :-d]}, {"qkv": qkv.bfloat16()}, {"qkv": qkv.t().contiguous().t()},
           {"kv_heads": 3}, {"lengths": lengths.int()}, {"write_slots": torch.tensor([0])},
           {"v_pool": torch.zeros(9, kv_heads, 2 * d)}, {"cos": torch.ones(1, d)}, {"heads": 0, "kv_heads": 0},
           {"lengths": torch.tensor([1, 3])}, {"lengths": torch.tensor([0, 2])},  # lengths past the slots' width
           {"heads": 3, "qkv": torch.randn(2, (3 + 2 * kv_heads) * d)},  # 3 query heads over 2 key/value heads
           {"qkv": torch.randn(2, (heads + 2 * kv_heads) * 8), "cos": torch.ones(2, 8), "sin_signed": torch.zeros(2, 8),
            "k_pool": torch.zeros(9, kv_heads, 8), "v_pool": torch.zeros(9, kv_heads, 8)}]  # head size 8
    for change in bad:
        with pytest.raises(ValueError, match="decode attention"):
            da.decode_attention(**(good | change))
    assert not k_pool.any() and not v_pool.any()
    assert da.decode_attention(**good).shape == (2, heads * d)


def test_a_nan_or_infinite_key_reaches_the_output_as_in_torch(cpu_kernels):
    """Not a finite average of the values: the next hop's finiteness check must see the fault. (An
    infinite key whose score is -inf gets no weight, in torch as here; +inf makes the head NaN.)"""
    _skip_without_kernel()
    heads, kv_heads, d = 2, 1, 16
    qkv = torch.randn(2, (heads + 2 * kv_heads) * d, generator=torch.Generator().manual_seed(5))
    cos, sin = torch.ones(2, d), torch.zeros(2, d)
    write, keys, lengths = torch.tensor([0, 4]), torch.tensor([[0, 8, 8], [2, 3, 4]]), torch.tensor([1, 3])
    for bad in (float("nan"), float("inf"), -float("inf")):
        k_pool, v_pool = torch.randn(9, kv_heads, d), torch.randn(9, kv_heads, d)
        k_pool[2, 0, 3] = bad  # a key of the second session only
        want = _reference(qkv, heads, kv_heads, cos, sin, k_pool, v_pool, write, keys, lengths, None)[0]
        out = da.decode_attention(qkv, heads, kv_heads, cos, sin, k_pool, v_pool, write, keys, lengths, None)
        assert out[0].isfinite().all() and out[1].isnan().any()
        assert torch.equal(out.isnan(), want.isnan())


def test_the_torch_ops_serve_where_the_kernel_cannot(monkeypatch, tmp_path):
    """Head sizes not a multiple of 16, float16, other devices, PETALD_NATIVE_ATTENTION=0, and no compiler:
    on any machine (where the kernel is missing, it is never usable)."""
    assert not da.native_decode_attention_usable(torch.float32, CPU, 24)
    assert not da.native_decode_attention_usable(torch.float16, CPU, 64)
    assert not da.native_decode_attention_usable(torch.float32, torch.device("cuda"), 64)
    monkeypatch.setenv("PETALD_NATIVE_ATTENTION", "0")
    assert not da.native_decode_attention_usable(torch.float32, CPU, 64)
    monkeypatch.delenv("PETALD_NATIVE_ATTENTION")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    unbuilt = NativeLibrary(cache_dir=tmp_path)  # nothing built there yet
    assert not da.native_decode_attention_usable(torch.float32, CPU, 64, library=unbuilt)
    assert unbuilt.load() is None and not list(tmp_path.rglob("*.so"))
