"""A Hugging Face model directory (config.json + safetensors, sharded or not) as a source."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig

from petald.kernels.models.registry import family_of
from petald.kernels.sampling import end_of_sequence_ids
from petald.kernels.sources.fingerprint_cache import cached_fingerprint
from petald.kernels.sources.model_source import ModelIdentity, ModelSourceError, check_supported

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class HFDirectorySource:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ModelSourceError(f"{self.path} has no config.json: not a Hugging Face model directory")
        self.config = AutoConfig.from_pretrained(str(self.path))
        check_supported(self.config, str(self.path))
        self._add_generation_end_ids()
        self._file_of = self._weight_map()
        # The base model's prefix of the family's names (``transformer.``, ``model.``) where this directory's
        # names lack it, having been saved from the base model (BLOOM's checkpoints); else "".
        first = family_of(self.config).block_prefix.split(".", 1)[0] + "."
        self._base_prefix = "" if any(n.startswith(first) for n in self._file_of) else first
        files = sorted({self.path / f for f in self._file_of.values()})
        self.identity = ModelIdentity(
            name=getattr(self.config, "_name_or_path", "") or self.path.name,
            fingerprint=cached_fingerprint(self.path, self._fingerprint, files),
            num_blocks=self.config.num_hidden_layers,
        )
        if self.identity.name in ("", str(self.path)):
            self.identity = ModelIdentity(self.path.name, self.identity.fingerprint, self.identity.num_blocks)

    def _add_generation_end_ids(self) -> None:
        """Add generation_config.json's end-of-sequence ids to the config's: Llama 3.0 Instruct's
        config.json names one (<|end_of_text|>) and its generation config also the chat turn's end
        (<|eot_id|>), at which transformers' generate stops too."""
        path = self.path / "generation_config.json"
        try:
            more = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelSourceError(f"{path} is not a readable generation config: {exc}") from exc
        if more is not None:
            ids = end_of_sequence_ids(self.config.eos_token_id, more)
            self.config.eos_token_id = ids[0] if len(ids) == 1 else ids

    def _weight_map(self) -> dict[str, str]:
        if (self.path / _INDEX).is_file():
            return dict(json.loads((self.path / _INDEX).read_text())["weight_map"])
        if (self.path / _SINGLE).is_file():
            with safe_open(str(self.path / _SINGLE), "pt") as f:
                return {k: _SINGLE for k in f.keys()}
        raise ModelSourceError(f"{self.path} has neither {_SINGLE} nor {_INDEX}")

    def _fingerprint(self) -> str:
        # Hash tensors by name, not files, so sharding does not change the fingerprint.
        digest = hashlib.blake2b(digest_size=32)
        for name in sorted(self._file_of):
            tensor = self._get(name)
            digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}".encode())
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.path / self._file_of[name]), "pt") as f:
            return f.get_tensor(name)

    def _get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self._file_of[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with safe_open(str(self.path / file), "pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        return out

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.config.num_hidden_layers:
            raise ModelSourceError(f"block {index} out of range [0, {self.config.num_hidden_layers})")
        prefix = self._stored_name(family_of(self.config).block_prefix.format(index=index))
        names = [n for n in self._file_of if n.startswith(prefix)]
        return {n[len(prefix):]: t.float() for n, t in self._get_many(names).items()}

    def client_tensors(self) -> dict[str, torch.Tensor]:
        wanted = {self._stored_name(n): ours for n, ours in family_of(self.config).client_tensors}
        got = self._get_many([n for n in wanted if n in self._file_of])
        out = {wanted[n]: t.float() for n, t in got.items()}
        out.setdefault("lm_head.weight", out["embed_tokens.weight"])
        return out

    def _stored_name(self, name: str) -> str:
        """``name`` (or a prefix of names) as this directory stores it: without the base model's own prefix
        (``transformer.``) where the weights were saved from the base model, as BLOOM's checkpoints were."""
        base = self._base_prefix
        return name[len(base):] if base and name.startswith(base) else name

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.path))
        except Exception as exc:
            raise ModelSourceError(f"{self.path} has no usable tokenizer: {exc}") from exc
