"""Who volunteers: the simulated servers' hardware, and how many blocks each one takes.

The model is Llama-2-70B's shape (80 blocks, hidden 8192, 8 KV heads) in float16: a block's
weights are 1.7 GB, so a 12 GB card holds a handful and an 80 GB one about forty. Each server's
block count is petald's own ``blocks_that_fit`` (what ``--blocks auto`` computes) for its memory
beside the default KV budget. A server's decode throughput per block is memory-bound: its
bandwidth over a block's bytes, at ~60% efficiency, spread +-20% (drivers, cooling, other load).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import LlamaConfig

from petald.kernels.memory_plan import blocks_that_fit, weight_bytes_per_block
from petald.p2pnode.server.block_server import ServerLimits

DTYPE = torch.float16
DECODE_EFFICIENCY = 0.6
LOAD_S_PER_GB = 0.5  # reading a block from a local disk cache at ~2 GB/s

# (name, memory for petald in GiB, memory bandwidth in GB/s, share of volunteers)
HARDWARE = [
    ("rtx3060-12g", 11.0, 360, 0.20), ("t4-16g", 15.0, 300, 0.15), ("rtx3090-24g", 22.5, 936, 0.25),
    ("rtx4090-24g", 22.5, 1008, 0.15), ("a6000-48g", 46.0, 768, 0.10), ("a100-80g", 78.0, 2039, 0.10),
    ("h100-80g", 78.0, 3350, 0.05),
]


def model_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)


@dataclass(frozen=True)
class Hardware:
    name: str
    blocks: int  # what --blocks auto takes (blocks_that_fit)
    inference_rps: float  # decode steps per second through one block
    load_s_per_block: float


class HardwarePool:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.config = model_config()
        block_bytes = weight_bytes_per_block(self.config, DTYPE)
        cache_tokens = ServerLimits().cache_tokens
        self.kinds = [(name, blocks_that_fit(self.config, DTYPE, int(gib * 2**30), cache_tokens), gbps * 1e9 / block_bytes)
                      for name, gib, gbps, _ in HARDWARE]
        shares = np.array([h[3] for h in HARDWARE])
        self.shares = shares / shares.sum()
        self.load_s_per_block = block_bytes / 1e9 * LOAD_S_PER_GB

    @property
    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    def draw(self) -> Hardware:
        name, blocks, rps = self.kinds[self.rng.choice(len(self.kinds), p=self.shares)]
        noisy = rps * DECODE_EFFICIENCY * float(self.rng.uniform(0.8, 1.2))
        return Hardware(name, blocks, noisy, self.load_s_per_block)
