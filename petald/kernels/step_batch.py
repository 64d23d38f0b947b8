"""What one batched forward needs: the tokens of several sessions' steps, flattened, and their
attention over the paged KV cache (the block's ``Attention`` for a server's steps).

A forward runs N tokens ([N, hidden]) that belong to segments: one segment is
one batch row of one session's step, positions [start, start + length). The
per-token work (matmuls, norms, rotary) runs once over all N; attention runs per
segment over that segment's own pages. Single-token segments (decode steps) are
gathered into one padded attention call; longer ones (prefill chunks) each get
their own causal call. On CPU, the decode steps skip all of this for petald's C
kernel (``StepBatch.attend``, ``kernels/native/decode_attention.py``), in blocks where it
is usable (``TransformerBlock.native_decode``): the whole batch when it holds decode steps
only, else the decode steps' rows, beside torch's ops for the longer segments (a prefill
chunk, or a speculative verify step of a few tokens batched with other sessions' decode steps).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from petald.kernels.native.decode_attention import decode_attention
from petald.kernels.paged_kv_cache import PagedKVCache, SessionCache
from petald.kernels.rotary import RotaryTable, apply_rotary
from petald.kernels.softcap_attention import block_attention

if TYPE_CHECKING:
    from petald.kernels.block import TransformerBlock


@dataclass
class Segment:
    session: SessionCache
    row: int
    start: int  # first position
    length: int


@dataclass
class Prefill:
    first: int  # rows [first, last) of the flattened tokens
    last: int
    start: int  # position of the first token
    key_slots: torch.Tensor  # slots of positions [0, start + length)


class StepBatch:
    def __init__(self, segments: list[Segment], pool: PagedKVCache, rotary: RotaryTable, device: torch.device):
        if any(s.start + s.length > rotary.max_positions for s in segments):
            raise ValueError(f"positions beyond the model's {rotary.max_positions}")
        self.device = device
        self._masks: dict[tuple[int, int | None], torch.Tensor | None] = {}
        decode = [s for s in segments if s.length == 1]
        self.all_decode = len(decode) == len(segments)
        # Built from Python ints and table views, a few tensor ops per step whatever the batch:
        # this runs once per step and server, and a lone decode step's compute on a small span is
        # about as short as this bookkeeping used to be.
        if self.all_decode:
            self.num_tokens = len(segments)
            positions = torch.tensor([s.start for s in segments])
            self.write_slots = torch.tensor([pool.slot(s.session, s.row, s.start) for s in segments])
        else:
            self.num_tokens = sum(s.length for s in segments)
            positions = torch.cat([torch.arange(s.start, s.start + s.length) for s in segments])
            self.write_slots = torch.cat([pool.slots(s.session, s.row, s.start, s.start + s.length)
                                          for s in segments])
        positions, self.write_slots = positions.to(device), self.write_slots.to(device)
        # [N, 1, head_dim]: broadcast over heads (None for a family without rotary: ALiBi's)
        self.cos = None if rotary.cos is None else rotary.cos[positions][:, None]
        self.sin_signed = None if rotary.sin_signed is None else rotary.sin_signed[positions][:, None]

        self.decode_rows: torch.Tensor | None = None
        if decode:
            lengths = [s.start + 1 for s in decode]
            longest = max(lengths)
            self._uniform = min(lengths) == longest
            if len(decode) == 1:
                s = decode[0]
                slots = pool.slots(s.session, s.row, 0, longest)[None]
            else:
                # Padding reads the pool's zero slot (masked out, and finite whatever the pool holds).
                slots = torch.full((len(decode), longest), pool.pad_slot, dtype=torch.long)
                for i, s in enumerate(decode):
                    slots[i, : lengths[i]] = pool.slots(s.session, s.row, 0, lengths[i])
            self.decode_slots = slots.to(device)
            self._decode_lengths = lengths
            self.decode_lengths = torch.tensor(lengths)  # on CPU: kernels/native/decode_attention.py reads it
            if not self.all_decode:
                offsets = list(itertools.accumulate((s.length for s in segments), initial=0))
                self.decode_rows = torch.tensor([offset for offset, s in zip(offsets, segments, strict=False)
                                                 if s.length == 1], device=device)
                self.prefill_rows = torch.cat([torch.arange(offset, offset + s.length)
                                               for offset, s in zip(offsets, segments, strict=False)
                                               if s.length > 1]).to(device)
        self.prefills = []
        first = 0
        for s in segments:
            if s.length > 1:
                self.prefills.append(Prefill(first, first + s.length, s.start,
                                             pool.slots(s.session, s.row, 0, s.start + s.length).to(device)))
            first += s.length

    def decode_mask(self, window: int | None) -> torch.Tensor | None:
        """[S, 1, 1, longest] (True = attend), or None when every decode row sees all its keys."""
        key = (-1, window)
        if key not in self._masks:
            if self._uniform and (window is None or max(self._decode_lengths) <= window):
                self._masks[key] = None
            else:
                lengths = torch.tensor(self._decode_lengths, device=self.device)
                k = torch.arange(self.decode_slots.shape[1], device=self.device)[None, :]
                mask = k < lengths[:, None]
                if window is not None:
                    mask &= k > lengths[:, None] - 1 - window
                self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor:
        """[T, start + T] causal mask (True = attend), with the sliding window if the block has one."""
        key = (index, window)
        if key not in self._masks:
            p = self.prefills[index]
            q_pos = torch.arange(p.start, p.start + p.last - p.first, device=self.device)[:, None]
            k_pos = torch.arange(p.start + p.last - p.first, device=self.device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            self._masks[key] = mask
        return self._masks[key]

    def attend(self, block: TransformerBlock, qkv: torch.Tensor, k_pool: torch.Tensor,
               v_pool: torch.Tensor) -> torch.Tensor:
        """Rotary, the cache write and attention: [N, heads * head_dim] from ``qkv`` of ``block``,
        whose keys and values live in ``k_pool`` and ``v_pool``.

        A batch of decode steps, in a block where it is usable, runs all of it in one C call
        (``kernels/native/decode_attention.py``); anything else runs torch's ops."""
        if self.all_decode and block.native_decode:
            return decode_attention(qkv, block.n_heads, block.n_kv_heads, self.cos, self.sin_signed,
                                    k_pool, v_pool, self.write_slots, self.decode_slots,
                                    self.decode_lengths, block.window, block.native_decode)
        if self.decode_rows is not None and block.native_decode:
            return self._attend_mixed(block, qkv, k_pool, v_pool)
        n, heads, kv_heads, head_dim = qkv.shape[0], block.n_heads, block.n_kv_heads, block.head_dim
        q_and_k = block.q_size + block.kv_size
        # Queries and keys rotated in one call: half the small ops of rotating each (not at all with ALiBi).
        qk = qkv[:, :q_and_k].view(n, heads + kv_heads, head_dim)
        if block.alibi is None:
            qk = apply_rotary(qk, self.cos, self.sin_signed)
        q, k = qk[:, :heads], qk[:, heads:]
        k_pool.index_copy_(0, self.write_slots, k)
        v_pool.index_copy_(0, self.write_slots, qkv[:, q_and_k:].view(n, kv_heads, head_dim))
        return self._attend_segments(block, q, k_pool, v_pool).reshape(n, block.q_size)

    def _attend_mixed(self, block: TransformerBlock, qkv: torch.Tensor, k_pool: torch.Tensor,
                      v_pool: torch.Tensor) -> torch.Tensor:
        """``attend`` for a batch of decode steps and longer segments: the decode rows in the C
        kernel, the others' rotary, cache write and attention in torch's ops."""
        rows = self.decode_rows
        out = qkv.new_empty(qkv.shape[0], block.q_size)
        out[rows] = decode_attention(qkv[rows], block.n_heads, block.n_kv_heads, self.cos[rows].contiguous(),
                                     self.sin_signed[rows].contiguous(), k_pool, v_pool, self.write_slots[rows],
                                     self.decode_slots, self.decode_lengths, block.window, block.native_decode)
        rows = self.prefill_rows
        heads, kv_heads, head_dim = block.n_heads, block.n_kv_heads, block.head_dim
        q_and_k = block.q_size + block.kv_size
        part = qkv[rows]
        qk = apply_rotary(part[:, :q_and_k].view(len(rows), heads + kv_heads, head_dim), self.cos[rows],
                          self.sin_signed[rows])
        k_pool.index_copy_(0, self.write_slots[rows], qk[:, heads:])
        v_pool.index_copy_(0, self.write_slots[rows], part[:, q_and_k:].view(len(rows), kv_heads, head_dim))
        q = qkv.new_empty(qkv.shape[0], heads, head_dim)  # the decode rows' stay unread
        q[rows] = qk[:, :heads]
        attended = self._attend_prefills(block, q, k_pool, v_pool, torch.empty_like(q))
        out[rows] = attended[rows].reshape(len(rows), block.q_size)
        return out

    def _attend_segments(self, block: TransformerBlock, q: torch.Tensor, k_pool: torch.Tensor,
                         v_pool: torch.Tensor) -> torch.Tensor:
        """Attention of each segment's queries [N, heads, head_dim] over that segment's own pages."""
        if self.all_decode:
            return self._attend_decode(block, q, k_pool, v_pool)
        out = torch.empty_like(q)
        if self.decode_rows is not None:
            out[self.decode_rows] = self._attend_decode(block, q[self.decode_rows], k_pool, v_pool)
        return self._attend_prefills(block, q, k_pool, v_pool, out)

    def _attend_prefills(self, block: TransformerBlock, q: torch.Tensor, k_pool: torch.Tensor,
                         v_pool: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` [N, heads, head_dim], each longer segment's rows filled with its causal attention."""
        for index, p in enumerate(self.prefills):
            k = k_pool.index_select(0, p.key_slots).transpose(0, 1).unsqueeze(0)  # [1, kv_heads, keys, head_dim]
            v = v_pool.index_select(0, p.key_slots).transpose(0, 1).unsqueeze(0)
            a = block_attention(q[p.first : p.last].transpose(0, 1).unsqueeze(0), k, v,
                                self.prefill_mask(index, block.window), block.scale, block.softcap,
                                enable_gqa=block.n_heads != block.n_kv_heads,
                                alibi=None if block.alibi is None else block.alibi.view(-1, 1, 1))
            out[p.first : p.last] = a[0].transpose(0, 1)
        return out

    def _attend_decode(self, block: TransformerBlock, q: torch.Tensor, k_pool: torch.Tensor,
                       v_pool: torch.Tensor) -> torch.Tensor:
        """All single-token segments in one call: q [S, heads, head_dim] over keys padded to the longest.

        The query heads that share a key/value head attend as the rows of one query matrix
        ([S, kv_heads, group, head_dim]): the arithmetic of ``enable_gqa``, without its expansion of the
        keys. On CPU, for 16 sessions, float32 is 1.1-1.8x and bfloat16 4.5-7x faster, and one session is
        no slower (decisions.md, "bfloat16 on CPU"). Prefill chunks keep ``enable_gqa``: there the
        grouped form measured slower.
        """
        seqs, longest = self.decode_slots.shape
        kv_heads, head_dim = block.n_kv_heads, block.head_dim
        slots = self.decode_slots.view(-1)
        k = k_pool.index_select(0, slots).view(seqs, longest, kv_heads, head_dim).transpose(1, 2)
        v = v_pool.index_select(0, slots).view(seqs, longest, kv_heads, head_dim).transpose(1, 2)
        group = block.n_heads // kv_heads
        a = block_attention(q.view(seqs, kv_heads, group, head_dim), k, v, self.decode_mask(block.window),
                            block.scale, block.softcap,
                            alibi=None if block.alibi is None else block.alibi.view(kv_heads, group, 1))
        return a.reshape(seqs, block.n_heads, head_dim)
