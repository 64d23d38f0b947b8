"""Forward and backward through a span for training: whole sequences, no KV cache, frozen weights.

A training request carries whole sequences [batch, tokens, hidden] at positions
0..tokens-1, so attention is plain causal attention over the request's own
tokens; nothing is kept between requests. The blocks run their own forward
(``TransformerBlock.forward``, as for a server's steps) with that attention
(``WholeSequences``) instead of the paged KV cache's. Backward recomputes the forward under
autograd from the inputs the client sends again (as Petals does): a server holds
no activations between a client's forward and its backward, so a client that
vanishes costs it nothing, and any replica of the span can answer the backward.

Deep prompts (deep prompt tuning, P-tuning v2 as Petals runs it): ``prompts``
[blocks, batch or 1, P, hidden] is added to the first P positions of the hidden
states before each block of the span. Gradients flow to the inputs and the
prompts only; weights never require grad.
"""

from __future__ import annotations

import torch

from petald.kernels.adapters.lora import LoraAdapter
from petald.kernels.block import TransformerBlock
from petald.kernels.deep_prompts import check_deep_prompts
from petald.kernels.rotary import RotaryTable, apply_rotary
from petald.kernels.softcap_attention import block_attention
from petald.kernels.span import BlockSpan


class WholeSequences:
    """The blocks' attention for training (``block.Attention``): sequences [B, T] at positions
    0..T-1, causal (within each block's sliding window), over their own keys only; nothing is
    cached."""

    def __init__(self, rotary: RotaryTable, tokens: int, device: torch.device):
        # [T, 1, head_dim]: broadcast over the batch rows and heads (None without rotary: ALiBi's)
        self.cos = None if rotary.cos is None else rotary.cos[:tokens, None]
        self.sin_signed = None if rotary.sin_signed is None else rotary.sin_signed[:tokens, None]
        self.tokens, self.device = tokens, device
        self._masks: dict[int, torch.Tensor] = {}  # by window: the blocks of a span share one

    def attend(self, block: TransformerBlock, qkv: torch.Tensor, k_pool: None = None,
               v_pool: None = None) -> torch.Tensor:
        b, t, _ = qkv.shape
        heads, kv_heads, head_dim = block.n_heads, block.n_kv_heads, block.head_dim
        q_and_k = block.q_size + block.kv_size
        qk = qkv[..., :q_and_k].reshape(b, t, heads + kv_heads, head_dim)
        if block.alibi is None:
            qk = apply_rotary(qk, self.cos, self.sin_signed)
        q, k = qk[:, :, :heads], qk[:, :, heads:]
        v = qkv[..., q_and_k:].reshape(b, t, kv_heads, head_dim)
        mask = self._window_mask(block.window)
        attn = block_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, block.scale,
                               block.softcap, is_causal=mask is None, enable_gqa=heads != kv_heads,
                               alibi=None if block.alibi is None else block.alibi.view(-1, 1, 1))
        return attn.transpose(1, 2).reshape(b, t, block.q_size)

    def _window_mask(self, window: int | None) -> torch.Tensor | None:
        """[T, T] (True = attend) where a sliding window is shorter than the sequences, else None
        (causal attention)."""
        if window is None or self.tokens <= window:
            return None
        if window not in self._masks:
            pos = torch.arange(self.tokens, device=self.device)
            causal = pos[None, :] <= pos[:, None]
            self._masks[window] = causal & (pos[None, :] > pos[:, None] - window)
        return self._masks[window]


def check_training_inputs(span: BlockSpan, hidden: torch.Tensor, start: int, end: int,
                          prompts: torch.Tensor | None) -> None:
    """Raise ValueError naming the first input that does not fit blocks [start, end) of ``span``."""
    if not span.start <= start < end <= span.end:
        raise ValueError(f"blocks {start}:{end} are outside this span {span.start}:{span.end}")
    if hidden.dim() != 3 or hidden.shape[2] != span.hidden_size or hidden.shape[1] < 1 or hidden.shape[0] < 1:
        raise ValueError(f"hidden has shape {list(hidden.shape)}; expected [batch, tokens, {span.hidden_size}]")
    if hidden.shape[1] > span.max_positions:
        raise ValueError(f"{hidden.shape[1]} tokens exceed the model's {span.max_positions} positions")
    if prompts is None:
        return
    check_deep_prompts(prompts, end - start, hidden.shape[0], span.hidden_size, hidden.shape[1])


def span_forward(span: BlockSpan, hidden: torch.Tensor, start: int, end: int,
                 prompts: torch.Tensor | None = None, adapter: LoraAdapter | None = None) -> torch.Tensor:
    """Blocks [start, end) of ``span`` over ``hidden`` [B, T, hidden], differentiable in ``hidden`` and
    ``prompts``; the output is in the span's compute dtype, on its device."""
    check_training_inputs(span, hidden, start, end, prompts)
    x = hidden.to(span.device, span.dtype)
    sequences = WholeSequences(span.rotary, x.shape[1], span.device)
    if prompts is not None:
        prompts = prompts.to(span.device, span.dtype)
    for index in range(start, end):
        if prompts is not None:
            prompt = prompts[index - start]
            n = prompt.shape[1]
            x = torch.cat([x[:, :n] + prompt, x[:, n:]], dim=1)
        lora = adapter.block(index) if adapter is not None else None
        x = span.blocks[index - span.start].forward(x, sequences, lora=lora)
    return x


def span_backward(span: BlockSpan, hidden: torch.Tensor, grad_output: torch.Tensor, start: int, end: int,
                  prompts: torch.Tensor | None = None, adapter: LoraAdapter | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of ``(span_forward(hidden, prompts) * grad_output).sum()`` with respect to ``hidden`` and
    ``prompts`` (None without prompts), recomputing the forward; both on the CPU in float32."""
    if grad_output.shape != hidden.shape:
        raise ValueError(f"grad_output has shape {list(grad_output.shape)}; expected {list(hidden.shape)}")
    with torch.enable_grad():
        x = hidden.detach().to(span.device, span.dtype).requires_grad_()
        p = prompts.detach().to(span.device, span.dtype).requires_grad_() if prompts is not None else None
        out = span_forward(span, x, start, end, p, adapter)
        inputs = [x] if p is None else [x, p]
        grads = torch.autograd.grad(out, inputs, grad_output.to(out.device, out.dtype))
    grad_hidden = grads[0].to("cpu", torch.float32)
    return grad_hidden, (grads[1].to("cpu", torch.float32) if p is not None else None)
