"""Mixture of experts (Mixtral): a batched step runs each chosen expert once over all its tokens, and
batching does not change what a session gets."""

from __future__ import annotations

import torch

from petald.kernels.client_head import ClientHead
from petald.kernels.sources.open_source import open_source
from petald.kernels.span import BlockSpan
from tests.tiny_models import TINY_BLOCKS

CPU = torch.device("cpu")


class Counted:
    """A linear layer that counts its calls and the rows it was given."""

    def __init__(self, linear):
        self.linear, self.calls, self.rows = linear, 0, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        return self.linear(x)


def test_a_batched_step_runs_each_expert_once_and_matches_sessions_run_alone(tiny_models):
    source = open_source(str(tiny_models["mixtral"]))
    span = BlockSpan(source, 0, TINY_BLOCKS, torch.float32, CPU)
    head = ClientHead(source)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 320, (1, n), generator=gen) for n in (7, 12, 3, 9)]
    pool = span.new_pool(len(prompts) * 16 * TINY_BLOCKS, page_size=16)
    caches = [pool.open(1, 16) for _ in prompts]
    alone = []
    for prompt in prompts:  # each session's prefill and one decode step, by itself
        cache = span.new_cache(1, 16)
        span.forward(head.embed(prompt), cache)
        alone.append(span.forward(head.embed(prompt[:, -1:]), cache))
    span.forward_batch([(head.embed(p), c) for p, c in zip(prompts, caches, strict=True)])
    counters = [[Counted(e.gate_up) for e in block.moe.experts] for block in span.blocks]
    for block, counted in zip(span.blocks, counters, strict=True):
        for expert, counter in zip(block.moe.experts, counted, strict=True):
            expert.gate_up = counter
    batched = span.forward_batch([(head.embed(p[:, -1:]), c) for p, c in zip(prompts, caches, strict=True)])
    top_k = source.config.num_experts_per_tok
    for counted in counters:  # per block: every expert at most once; every token's top_k choices served
        assert all(c.calls <= 1 for c in counted)
        assert sum(c.rows for c in counted) == len(prompts) * top_k
        assert sum(c.calls for c in counted) > 1  # the sessions did not all pick the same experts
    for got, want in zip(batched, alone, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
