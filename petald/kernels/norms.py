"""The norms a block and the client head apply: RMSNorm (Llama's) or LayerNorm with a bias (Falcon's, BLOOM's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # the same arithmetic, fewer ops
    # Normalise in fp32 whatever the compute dtype, as the reference models do.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class Norm:
    """One norm's weights: an RMSNorm without ``bias``, a LayerNorm with it (in the compute dtype, as
    torch's LayerNorm runs in the reference models)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
        self.weight, self.bias, self.eps = weight, bias, eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return rms_norm(x, self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]


def load_norm(tensors: dict[str, torch.Tensor], name: str, layer_norm: bool, weight_offset: float, eps: float,
              dtype: torch.dtype, device: torch.device | str) -> Norm:
    """The norm ``name`` of ``tensors`` (``{name}.weight``, and ``{name}.bias`` for a LayerNorm); an RMS
    weight stored as w for a scale of ``weight_offset`` + w (Gemma) gets the offset added."""
    weight = (tensors[f"{name}.weight"] + weight_offset).to(device=device, dtype=dtype).contiguous()
    bias = tensors[f"{name}.bias"].to(device=device, dtype=dtype).contiguous() if layer_norm else None
    return Norm(weight, bias, eps)
