"""What a client holds locally: token embeddings (and their norm, BLOOM's), the final norm and the LM head."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from petald.kernels.models.registry import family_of
from petald.kernels.norms import Norm, load_norm
from petald.kernels.quant import (
    DenseLinear,
    QuantError,
    check_quant,
    make_linear,
    native_bfloat16_matmul,
)
from petald.kernels.sources.model_source import ModelSource
from petald.vocabulary import HEAD_QUANT_MODES

log = logging.getLogger(__name__)

# How the LM head's matrix may be stored (HEAD_QUANT_MODES): the blocks' modes, plus "bf16": bfloat16
# weights (prepacked for oneDNN) multiplied by the normed hidden state rounded to bfloat16, while the
# embeddings, the final norm and the logits stay in the client's dtype. On a CPU that does not multiply
# bfloat16 natively (quant.native_bfloat16_matmul), "bf16" keeps the float32 head: it is faster there.


class ClientHead:
    """``quant`` stores the LM head (49152 x 576 for SmolLM2: the largest matrix a token touches) quantized,
    as ``--quant`` does for blocks, or in bfloat16 (``"bf16"``); the embeddings stay as loaded."""

    def __init__(self, source: ModelSource, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", quant: str = "none"):
        tensors = source.client_tensors()
        self.config = source.config
        self.dtype, self.device = dtype, torch.device(device)
        if quant not in HEAD_QUANT_MODES:
            raise QuantError(f"unknown head quantization {quant!r}: use one of {', '.join(HEAD_QUANT_MODES)}")
        if quant == "bf16" and self.device.type == "cpu" and not native_bfloat16_matmul():
            log.warning("--head-quant bf16: this CPU has no native bfloat16 matmul (AVX512-BF16 or AMX), where a "
                        "bfloat16 LM head is slower than a float32 one: using the float32 head (--head-quant none)")
            quant = "none"
        self.quant = quant  # as stored: "bf16" may have fallen back to "none"
        if quant != "bf16":
            try:
                check_quant(quant, self.device)
            except QuantError as exc:
                raise QuantError(f"the LM head cannot be stored as {quant}: {exc}") from None
        family = family_of(self.config)
        self.embed_weight = tensors["embed_tokens.weight"].to(self.device, dtype)
        self.eps = getattr(self.config, family.norm_eps_key)

        def norm(name: str) -> Norm:
            return load_norm(tensors, name, family.layer_norm, family.norm_weight_offset, self.eps, dtype, self.device)

        self.norm = norm("norm")
        self.norm_weight = self.norm.weight
        # BLOOM norms its embeddings (a LayerNorm) before the first block: here, where the embeddings live.
        self.embed_norm = norm("embed_norm") if "embed_norm.weight" in tensors else None
        # Gemma's embeddings are scaled by sqrt(hidden), rounded to the embeddings' dtype as transformers does.
        scale = family.embedding_scale(self.config)
        self.embed_scale = None if scale is None else torch.tensor(scale, dtype=dtype, device=self.device)
        self.final_softcap = family.final_softcap(self.config)
        lm = tensors["lm_head.weight"]
        tied = lm is tensors["embed_tokens.weight"]
        # The head's matmul runs in this dtype; its output is brought back to float32 logits.
        self.head_dtype = torch.bfloat16 if quant == "bf16" else dtype
        self.lm_head = make_linear(self.embed_weight if tied else lm, None, "none" if quant == "bf16" else quant,
                                   self.head_dtype, self.device)
        if tied and isinstance(self.lm_head, DenseLinear) and self.head_dtype == dtype:
            # The dense head keeps its matrix transposed (faster on CPU); the embedding table becomes
            # a view of that copy, so a tied head still holds the matrix once.
            self.embed_weight = self.lm_head.weight_t.t()

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._embed(input_ids)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings = F.embedding(input_ids.to(self.device), self.embed_weight)
        if self.embed_scale is not None:
            embeddings = embeddings * self.embed_scale
        return embeddings if self.embed_norm is None else self.embed_norm(embeddings)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits_with_grad(hidden)

    def embed_detached(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings as plain tensors that an autograd graph may take in (``embed``'s are inference
        tensors, which autograd refuses), detached from the table: no gradient reaches it."""
        with torch.no_grad():
            return self._embed(input_ids)

    def logits_with_grad(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits, differentiable in ``hidden`` (training through the swarm); the head's weights stay frozen."""
        h = self.norm(hidden.to(self.device, self.dtype))
        logits = self.lm_head(h.to(self.head_dtype)).float()
        if self.final_softcap is not None:  # Gemma 2
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
