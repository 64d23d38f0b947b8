"""Remote blocks as one differentiable torch operation: the bridge between autograd and the swarm."""

from __future__ import annotations

from typing import Any

import torch

from petald.p2pnode.client.node_thread import NodeThread
from petald.p2pnode.client.training_pipeline import TrainingPipeline


class RemoteBlocksFunction(torch.autograd.Function):
    """``apply(hidden, prompts, node, pipeline, start, end)``: blocks [start, end) over ``hidden`` [B, T, H]
    with deep ``prompts`` [end - start, 1 or B, P, H] (or None). Its backward asks the servers for the
    gradients of both; the servers' weights never change."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, prompts: torch.Tensor | None, node: NodeThread,
                pipeline: TrainingPipeline, start: int, end: int) -> torch.Tensor:
        hidden = hidden.detach().float()
        prompts = prompts.detach().float() if prompts is not None else None
        output, trace = node.call(pipeline.forward, hidden, prompts, start, end)
        ctx.node, ctx.pipeline, ctx.trace, ctx.prompts = node, pipeline, trace, prompts
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_prompts = ctx.node.call(ctx.pipeline.backward, ctx.trace,
                                                  grad_output.detach().float().contiguous(), ctx.prompts)
        return grad_hidden, grad_prompts, None, None, None, None
