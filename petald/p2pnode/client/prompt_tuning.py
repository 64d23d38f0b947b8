"""Soft prompts: trainable embeddings in front of a distributed model whose weights stay frozen.

    model = DistributedModel(initial_peers=[...])
    tuned = PromptTuning(model, num_prompts=8, deep=True)
    optimizer = torch.optim.Adam(tuned.parameters(), lr=1e-2)
    loss = tuned.loss(input_ids, labels)      # -100 in labels: not scored
    loss.backward(); optimizer.step()         # gradients come back from the servers
    tuned.save("prompt.safetensors")
    tuned.generate(input_ids, max_new_tokens=20)

Prompt tuning (Lester et al., 2021) puts ``num_prompts`` trainable embeddings before the input;
deep prompt tuning (P-tuning v2, as Petals runs it) also adds a trainable prefix to the hidden
states of those first positions before every block, which the servers apply.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from petald.p2pnode.client.distributed_model import DistributedModel


class PromptTuning(torch.nn.Module):
    def __init__(self, model: DistributedModel, num_prompts: int, deep: bool = False,
                 init_text: str | None = None, seed: int = 0):
        """Shallow prompts start as the embeddings of ``init_text``'s tokens (repeated or cut to
        ``num_prompts``), or of random vocabulary tokens; deep prompts start at zero, so that
        an untrained deep prompt changes nothing beyond the shallow one."""
        super().__init__()
        if num_prompts < 1:
            raise ValueError("num_prompts must be at least 1")
        self.model = model
        config = model.config
        if init_text:
            ids = torch.as_tensor(model.tokenizer(init_text, add_special_tokens=False).input_ids)
            if ids.numel() == 0:
                raise ValueError("init_text has no tokens")
            ids = ids.repeat(num_prompts // ids.numel() + 1)[:num_prompts]
        else:
            ids = torch.randint(0, config.vocab_size, (num_prompts,), generator=torch.Generator().manual_seed(seed))
        self.prompts = torch.nn.Parameter(model.head.embed_detached(ids).float().clone())
        self.deep_prompts = torch.nn.Parameter(torch.zeros(config.num_hidden_layers, num_prompts,
                                                           config.hidden_size)) if deep else None

    @property
    def num_prompts(self) -> int:
        return self.prompts.shape[0]

    def _hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        embeds = self.model.head.embed_detached(input_ids).float()
        prefix = self.prompts[None].expand(input_ids.shape[0], -1, -1)
        deep = self.deep_prompts[:, None] if self.deep_prompts is not None else None
        return self.model.remote_blocks(torch.cat([prefix, embeds], dim=1), deep)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, tokens, vocab] at the positions of ``input_ids`` (after the prompts)."""
        return self.model.head.logits_with_grad(self._hidden(input_ids)[:, self.num_prompts:])

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy; ``labels`` (default: ``input_ids``) equal to -100 are not scored."""
        input_ids = torch.as_tensor(input_ids)
        labels = input_ids if labels is None else torch.as_tensor(labels)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels have shape {list(labels.shape)}; input_ids have {list(input_ids.shape)}")
        logits = self(input_ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **kwargs) -> torch.LongTensor:
        """``DistributedModel.generate`` with the prompts in front: returns ``input_ids`` + new tokens."""
        deep = self.deep_prompts.detach() if self.deep_prompts is not None else None
        return self.model.generate(input_ids, max_new_tokens, prefix=self.prompts.detach(), deep_prompts=deep,
                                   **kwargs)

    def save(self, path: str | Path) -> None:
        """The prompts as safetensors, tagged with the model's fingerprint (loading checks it)."""
        tensors = {"prompts": self.prompts.detach().contiguous()}
        if self.deep_prompts is not None:
            tensors["deep_prompts"] = self.deep_prompts.detach().contiguous()
        identity = self.model.identity
        save_file(tensors, str(path), metadata={"model_id": identity.model_id, "fingerprint": identity.fingerprint})

    @classmethod
    def load(cls, model: DistributedModel, path: str | Path) -> PromptTuning:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("fingerprint") != model.identity.fingerprint:
            raise ValueError(f"{path} was trained for {metadata.get('model_id', 'another model')}, not "
                             f"{model.identity.model_id}: prompts only work with the weights they were trained on")
        tensors = load_file(str(path))
        tuned = cls(model, tensors["prompts"].shape[0], deep="deep_prompts" in tensors)
        with torch.no_grad():
            tuned.prompts.copy_(tensors["prompts"])
            if tuned.deep_prompts is not None:
                tuned.deep_prompts.copy_(tensors["deep_prompts"])
        return tuned
