"""What one batched forward needs: the tokens of several sessions' steps, flattened.

A forward runs N tokens ([N, hidden]) that belong to segments: one segment is
one batch row of one session's step, positions [start, start + length). The
per-token work (matmuls, norms, rotary) runs once over all N; attention runs per
segment over that segment's own pages. Single-token segments (decode steps) are
gathered into one padded attention call; longer ones (prefill chunks) each get
their own causal call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from petald.kernels.paged_kv_cache import PagedKVCache, SessionCache
from petald.kernels.rotary import RotaryTable


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
        positions = torch.cat([torch.arange(s.start, s.start + s.length) for s in segments]).to(device)
        self.cos = rotary.cos[positions][:, None]  # [N, 1, head_dim]: broadcast over heads
        self.sin = rotary.sin[positions][:, None]
        self.write_slots = torch.cat([pool.slots(s.session, s.row, s.start, s.start + s.length)
                                      for s in segments]).to(device)
        offsets, first = [], 0
        for s in segments:
            offsets.append(first)
            first += s.length
        self.num_tokens = first

        decode = [(offset, s) for offset, s in zip(offsets, segments, strict=True) if s.length == 1]
        self.decode_rows: torch.Tensor | None = None
        self.all_decode = False
        if decode:
            lengths = [s.start + 1 for _, s in decode]
            longest = max(lengths)
            # Padding reads the pool's zero slot (masked out, and finite whatever the pool holds).
            slots = torch.full((len(decode), longest), pool.pad_slot, dtype=torch.long)
            for i, (_, s) in enumerate(decode):
                slots[i, : lengths[i]] = pool.slots(s.session, s.row, 0, lengths[i])
            self.decode_rows = torch.tensor([offset for offset, _ in decode], device=device)
            self.all_decode = len(decode) == len(segments)
            self.decode_slots = slots.to(device)
            self.decode_lengths = torch.tensor(lengths, device=device)
            self._uniform = min(lengths) == longest
        self.prefills = [Prefill(offset, offset + s.length, s.start,
                                 pool.slots(s.session, s.row, 0, s.start + s.length).to(device))
                         for offset, s in zip(offsets, segments, strict=True) if s.length > 1]
        self.device = device
        self._masks: dict[tuple[int, int | None], torch.Tensor | None] = {}

    def decode_mask(self, window: int | None) -> torch.Tensor | None:
        """[S, 1, 1, longest] (True = attend), or None when every decode row sees all its keys."""
        key = (-1, window)
        if key not in self._masks:
            lengths = self.decode_lengths
            if self._uniform and (window is None or int(lengths.max()) <= window):
                self._masks[key] = None
            else:
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
