"""The paged KV cache: admission, page accounting, and attention over scattered pages and batched steps
against transformers' dense model."""

from __future__ import annotations

import pytest
import torch

from petald.kernels.client_head import ClientHead
from petald.kernels.native.native_library import CpuKernelError
from petald.kernels.paged_kv_cache import CacheFullError, PagedKVCache
from petald.kernels.sources.open_source import open_source
from petald.kernels.span import BlockSpan
from tests.oracle import reference_logits
from tests.tiny_models import TINY_BLOCKS, TINY_MODELS

CPU = torch.device("cpu")


def tiny_pool(pages: int = 10, page_size: int = 4) -> PagedKVCache:
    return PagedKVCache(2, pages, page_size, 2, 8, torch.float32, CPU)


def test_admission_reserves_max_length_and_refuses_what_it_cannot_hold():
    pool = tiny_pool()
    assert pool.capacity_tokens == pool.free_tokens == 10 * 4 * 2
    a = pool.open(batch=2, max_length=9)  # 2 rows x 3 pages
    assert pool.free_tokens == 4 * 4 * 2
    with pytest.raises(CacheFullError, match="KV cache full: batch 1 x max_length 17 needs 5 pages"):
        pool.open(batch=1, max_length=17)
    b = pool.open(batch=1, max_length=16)  # exactly the 4 pages left
    assert pool.free_tokens == 0
    pool.grow(a, 9)
    pool.grow(b, 16)  # reserved pages are always there, however the pool was used
    assert [len(r) for r in a.pages] == [3, 3] and len(b.pages[0]) == 4
    assert len({p for r in a.pages + b.pages for p in r}) == 10  # no page handed out twice
    with pytest.raises(ValueError, match="beyond max_length"):
        pool.grow(b, 17)
    pool.close(a)
    pool.close(a)  # twice is harmless
    assert pool.free_tokens == 6 * 4 * 2
    pool.close(b)
    assert pool.free_tokens == pool.capacity_tokens
    with pytest.raises(ValueError, match="closed"):
        pool.grow(b, 1)


def test_pages_are_taken_lazily():
    pool = tiny_pool()
    s = pool.open(batch=1, max_length=40)
    pool.grow(s, 5)
    assert len(s.pages[0]) == 2
    slots = pool.slots(s, 0, 3, 5)
    assert slots.tolist() == [s.pages[0][0] * 4 + 3, s.pages[0][1] * 4]
    assert pool.slot(s, 0, 4) == s.pages[0][1] * 4


def test_slot_table_follows_the_page_table_and_pads_the_rest():
    pool = tiny_pool()
    other = pool.open(batch=1, max_length=8)
    s = pool.open(batch=2, max_length=10)  # 3 pages per row
    pool.grow(s, 2)
    pool.grow(other, 8)  # interleaves pages, so s's pages are not contiguous
    pool.grow(s, 6)
    assert s.slot_table.shape == (2, 12)
    for row in range(2):
        want = [s.pages[row][p // 4] * 4 + p % 4 for p in range(8)] + [pool.pad_slot] * 4
        assert s.slot_table[row].tolist() == want


def test_budget_smaller_than_a_page_is_refused():
    with pytest.raises(ValueError, match="less than one page"):
        PagedKVCache.from_budget(10, 2, 16, 2, 8, torch.float32, CPU)


def scramble(pool: PagedKVCache) -> None:
    """Leave the free list out of order, so that sessions get scattered, non-adjacent pages."""
    sessions = [pool.open(1, pool.page_size) for _ in range(pool.num_pages)]
    for s in sessions:
        pool.grow(s, 1)
    for s in sessions[::3] + sessions[1::3] + sessions[2::3][::-1]:
        pool.close(s)


@pytest.mark.parametrize("attention", ["avx512", "avx2", "torch"])
@pytest.mark.parametrize("name", TINY_MODELS)
def test_batched_steps_over_scattered_pages_match_transformers(tiny_models, name, attention, monkeypatch):
    """Three sessions of different lengths share one scrambled pool full of NaN; their prefills run
    batched in uneven chunks, then their decode steps run batched (padded to the longest). Each one's logits match transformers' dense
    model on that session's whole sequence (mistral's sliding window of 24 is crossed). Decode steps
    run through each variant of petald's C kernel (kernels/native/decode_attention.py) and through torch's ops."""
    path = str(tiny_models[name])
    source = open_source(path)
    if attention == "torch":
        monkeypatch.setenv("PETALD_NATIVE_ATTENTION", "0")
    else:
        monkeypatch.setenv("PETALD_CPU_KERNELS", attention)
    try:
        span = BlockSpan(source, 0, TINY_BLOCKS, torch.float32, CPU)
    except CpuKernelError as exc:
        pytest.skip(str(exc))
    kernel = span.blocks[0].native_decode
    if kernel is None and attention != "torch" and span.blocks[0].softcap is not None:
        pytest.skip("soft-capped attention (Gemma 2) runs torch's ops: the C kernel does not cap scores")
    if kernel is None and attention != "torch" and span.blocks[0].alibi is not None:
        pytest.skip("ALiBi attention (BLOOM) runs torch's ops: the C kernel adds no bias")
    if (kernel.isa if kernel is not None else "torch") != attention:
        pytest.skip("petald's decode attention needs a C compiler and a CPU with AVX512F or AVX2 and FMA")
    head = ClientHead(source)
    pool = span.new_pool(64 * 16 * TINY_BLOCKS, page_size=16)
    scramble(pool)
    for slots in (*pool.keys, *pool.values):  # what a never-written slot may hold
        slots[: pool.pad_slot] = float("nan")
    gen = torch.Generator().manual_seed(3)
    lengths = [37, 5, 20]
    seqs = [torch.randint(0, 320, (1, n + 8), generator=gen) for n in lengths]
    caches = [pool.open(1, 64) for _ in seqs]
    logits: list[list[torch.Tensor]] = [[] for _ in seqs]

    def run(steps):  # steps: list of (session index, token slice)
        outs = span.forward_batch([(head.embed(seqs[i][:, a:b]), caches[i]) for i, (a, b) in steps])
        for (i, _), out in zip(steps, outs, strict=True):
            logits[i].append(head.logits(out))

    run([(0, (0, 16)), (1, (0, 5)), (2, (0, 3))])
    run([(0, (16, 37)), (2, (3, 20))])
    for t in range(8):
        run([(i, (n + t, n + t + 1)) for i, n in enumerate(lengths)])
    for i, seq in enumerate(seqs):
        want = reference_logits(path, seq)
        torch.testing.assert_close(torch.cat(logits[i], dim=1), want, atol=1e-4, rtol=1e-4)
    for c in caches:
        pool.close(c)
    assert pool.free_tokens == pool.capacity_tokens


def test_batched_rows_of_one_session_match_separate_sessions(tiny_models):
    source = open_source(str(tiny_models["llama"]))
    span = BlockSpan(source, 0, TINY_BLOCKS, torch.float32, CPU)
    hidden = ClientHead(source).embed(torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(2)))
    both = span.forward(hidden, span.new_cache(2, 16))
    for row in range(2):
        alone = span.forward(hidden[row : row + 1], span.new_cache(1, 16))
        torch.testing.assert_close(both[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_truncate_frees_the_pages_past_the_new_length_and_keeps_the_reservation():
    pool = tiny_pool()
    s = pool.open(batch=2, max_length=16)  # 4 pages per row reserved
    pool.grow(s, 14)
    s.length = 14
    kept = [row[:2] for row in s.pages]
    dropped = {p for row in s.pages for p in row[2:]}
    pool.truncate(s, 6)  # positions 0-5 live in pages 0 and 1 of each row
    assert s.length == 6 and s.pages == kept
    assert dropped <= set(pool._free)
    for row in range(2):
        assert s.slot_table[row, 8:].tolist() == [pool.pad_slot] * 8
    assert pool.free_tokens == 2 * 4 * 2  # still reserved up to max_length
    pool.grow(s, 16)  # and it grows again
    assert [len(r) for r in s.pages] == [4, 4]
    pool.truncate(s, 0)
    assert s.pages == [[], []]
    with pytest.raises(ValueError, match="cannot roll back to position 3: the session holds 0"):
        pool.truncate(s, 3)
    pool.close(s)
    assert pool.free_tokens == pool.capacity_tokens and len(pool._free) == pool.num_pages


def test_steps_after_a_rollback_match_transformers_on_the_kept_sequence(tiny_models):
    """Run 20 tokens, roll back to 11 (across a page boundary), run 6 others: the logits are those of
    the sequence the session now holds, as if the discarded tokens had never been sent."""
    path = str(tiny_models["llama"])
    source = open_source(path)
    span = BlockSpan(source, 0, TINY_BLOCKS, torch.float32, CPU)
    head = ClientHead(source)
    gen = torch.Generator().manual_seed(5)
    first, second = torch.randint(0, 320, (1, 20), generator=gen), torch.randint(0, 320, (1, 6), generator=gen)
    cache = span.new_cache(1, 32)
    span.forward(head.embed(first), cache)
    cache.pool.truncate(cache, 11)
    out = head.logits(span.forward(head.embed(second), cache))
    kept = torch.cat([first[:, :11], second], dim=1)
    torch.testing.assert_close(out, reference_logits(path, kept)[:, 11:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", ["avx512", "avx2", "torch"])
def test_verify_steps_batched_with_decode_steps_match_transformers(tiny_models, attention, monkeypatch):
    """Speculative decoding's verify steps (4 tokens, of which 2 are then rolled back) batched with two
    other sessions' decode steps: each session's logits are transformers' on what it holds. With
    petald's C kernel the decode rows run there, beside torch's ops for the verify rows."""
    path = str(tiny_models["llama"])
    source = open_source(path)
    if attention == "torch":
        monkeypatch.setenv("PETALD_NATIVE_ATTENTION", "0")
    else:
        monkeypatch.setenv("PETALD_CPU_KERNELS", attention)
    span = BlockSpan(source, 0, TINY_BLOCKS, torch.float32, CPU)
    kernel = span.blocks[0].native_decode
    if (kernel.isa if kernel is not None else "torch") != attention:
        pytest.skip("petald's decode attention needs a C compiler and a CPU with AVX512F or AVX2 and FMA")
    head = ClientHead(source)
    pool = span.new_pool(10 * 16 * TINY_BLOCKS, page_size=16)
    scramble(pool)
    gen = torch.Generator().manual_seed(6)
    decoding = [torch.randint(0, 320, (1, n + 3), generator=gen) for n in (9, 30)]
    verified = torch.randint(0, 320, (1, 12 + 3 * 4), generator=gen)
    caches = [pool.open(1, 48) for _ in range(3)]
    for seq, cache, n in zip([*decoding, verified], caches, (9, 30, 12), strict=True):
        span.forward(head.embed(seq[:, :n]), cache)
    kept = verified[:, :12]
    for step in range(3):
        chunk = verified[:, 12 + 4 * step : 16 + 4 * step]
        outs = span.forward_batch([*((head.embed(seq[:, n + step : n + step + 1]), cache)
                                    for seq, cache, n in zip(decoding, caches, (9, 30), strict=False)),
                                   (head.embed(chunk), caches[2])])
        for seq, out, n in zip(decoding, outs, (9, 30), strict=False):
            want = reference_logits(path, seq[:, : n + step + 1])[:, -1:]
            torch.testing.assert_close(head.logits(out), want, atol=1e-4, rtol=1e-4)
        want = reference_logits(path, torch.cat([kept, chunk], dim=1))[:, -4:]
        torch.testing.assert_close(head.logits(outs[2]), want, atol=1e-4, rtol=1e-4)
        pool.truncate(caches[2], caches[2].length - 2)  # two of the four refused
        kept = torch.cat([kept, chunk[:, :2]], dim=1)
