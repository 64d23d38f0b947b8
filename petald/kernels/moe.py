"""A mixture-of-experts MLP (Mixtral's): a router picks ``top_k`` experts per token, and the tokens of
a whole batched step are grouped by expert, so that each expert chosen by any token runs once, over
all its tokens, whatever the batch.

All experts of a block live on the server of that block, quantized as its other linear layers are
(``kernels/quant.py``); the router stays in the compute dtype: it is small, and a rounding there
would change which experts a token gets. The arithmetic follows transformers' Mixtral: router logits
in the compute dtype, softmax in float32, the top-k weights renormalized to sum to 1, each expert's
output weighted in float32 and added back in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from petald.kernels.models.family import ExpertLayout
from petald.kernels.quant import Linear


@dataclass
class Expert:
    gate_up: Linear  # gate's rows, then up's
    down: Linear


class MixtureOfExperts:
    def __init__(self, weights: dict[str, torch.Tensor], layout: ExpertLayout, config: PretrainedConfig,
                 linear: Callable[[list[str]], Linear], router: torch.Tensor):
        self.top_k = int(getattr(config, layout.top_k_key))
        count = int(getattr(config, layout.count_key))
        self.router = router  # [experts, hidden], in the compute dtype
        self.experts = []
        for index in range(count):
            prefix = layout.expert.format(expert=index)
            self.experts.append(Expert(linear([f"{prefix}.{layout.gate}", f"{prefix}.{layout.up}"]),
                                       linear([f"{prefix}.{layout.down}"])))

    def forward(self, h: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The MLP's output for ``h`` [..., hidden] (differentiable in ``h``)."""
        flat = h.reshape(-1, h.shape[-1])
        probs = torch.softmax(torch.nn.functional.linear(flat, self.router).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [N, top_k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for index in chosen.unique().tolist():  # each expert once, over every token that chose it
            rows, slot = torch.where(chosen == index)
            expert = self.experts[index]
            gate, up = expert.gate_up(flat[rows]).chunk(2, dim=-1)
            y = expert.down(activation(gate) * up) * weights[rows, slot, None]
            out = out.index_add(0, rows, y.to(out.dtype))
        return out.view(h.shape)
