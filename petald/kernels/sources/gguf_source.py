"""A GGUF file as a model source (llama.cpp's format; Llama-family architectures).

The file is memory-mapped; a tensor is dequantized only when asked for. GGUF
stores Q and K projections with llama.cpp's rotary row order for the families
whose rules say so (``kernels/models/``), so they are permuted back to Hugging
Face's order on load (the inverse of llama.cpp's converter).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from transformers import AutoConfig, PretrainedConfig

from petald.kernels.cache_dir import petald_cache_dir, read_json, write_json
from petald.kernels.models.registry import family_of
from petald.kernels.sources.fingerprint_cache import cached_fingerprint, file_stamp
from petald.kernels.sources.gguf_index import read_gguf_index
from petald.kernels.sources.model_source import ModelIdentity, ModelSourceError, check_supported

_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_CLIENT_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def _unpermute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    # llama.cpp interleaves each head's two rotary halves; undo it.
    head_dim_half = weight.shape[0] // n_heads // 2
    rest = weight.shape[1:]
    return weight.reshape(n_heads, head_dim_half, 2, *rest).transpose(1, 2).reshape(weight.shape)


class GGUFSource:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelSourceError(f"GGUF file not found: {self.path}")
        try:
            # The tensor index only: the metadata's values are parsed once, for the cached config.
            self._tensors = {t.name: t for t in read_gguf_index(self.path)}
        except Exception as exc:  # a bad header, a file cut short, a bad mapping
            raise ModelSourceError(f"{self.path} is not a readable GGUF file: {exc}") from exc
        self.config = self._read_config()
        self._head_dim_from_tensors()
        check_supported(self.config, str(self.path))
        if not family_of(self.config).gguf_supported:
            raise ModelSourceError(f"{self.path}: GGUF files of {self.config.model_type} models are not supported yet; "
                                   "use the model's Hugging Face directory")
        if "blk.0.ffn_gate_exps.weight" in self._tensors or "blk.0.ffn_gate_inp.weight" in self._tensors:
            # llama.cpp writes Mixtral as a "llama" with its experts stacked: read as a dense llama, it would
            # miss every MLP.
            raise ModelSourceError(f"{self.path}: mixture-of-experts GGUF files (Mixtral's ffn_*_exps) are not "
                                   "supported yet; use the model's Hugging Face directory")
        rope_tensors = sorted(name.removesuffix(".weight") for name in self._tensors if name.startswith("rope_"))
        if rope_tensors:
            # Llama 3.1+ (rope_freqs) and Phi-3's long-context GGUFs (rope_factors_long/short) carry their
            # rope scaling as tensors that transformers' GGUF parser does not turn into config; running
            # without them would be silently wrong.
            raise ModelSourceError(f"{self.path}: GGUF rope frequency factors ({', '.join(rope_tensors)}) are "
                                   "not supported yet; use the model's Hugging Face directory")
        self.identity = ModelIdentity(
            name=self.path.stem,
            fingerprint=cached_fingerprint(self.path, self._fingerprint),
            num_blocks=self.config.num_hidden_layers,
        )

    def _derived_dir(self) -> Path:
        """Where what we derive from this exact file (by path, size and mtime) is kept.

        Parsing a GGUF's metadata takes seconds (gguf-py walks the tokenizer's ~100k strings
        one numpy view at a time; ``gguf_index`` reads the tensors without it), and transformers
        parses it for the config and again for the tokenizer; both are kept here after the first time.
        """
        stamp = hashlib.blake2b(file_stamp([self.path]).encode(), digest_size=10).hexdigest()
        return petald_cache_dir() / "gguf" / stamp

    def _read_config(self) -> PretrainedConfig:
        cached = self._derived_dir() / "config.json"
        meta = read_json(cached)
        if not isinstance(meta, dict):
            # transformers' GGUF metadata parser: reads only the key/value section.
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

            meta = load_gguf_checkpoint(str(self.path), return_tensors=False)["config"]
            meta.pop("_model_name_or_path", None)
            write_json(cached, meta)
        model_type = meta.pop("model_type", None)
        if model_type is None:
            raise ModelSourceError(f"{self.path}: GGUF metadata names no architecture")
        return AutoConfig.for_model(model_type, **meta)

    def _head_dim_from_tensors(self) -> None:
        """Set the config's head size from the key projection's rows: transformers' GGUF parser reads no
        head size for most architectures (Qwen3's, which need not be hidden / heads, included)."""
        keys = self._tensors.get("blk.0.attn_k.weight")
        kv_heads = getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads
        if keys is not None and len(keys.shape) == 2:
            self.config.head_dim = int(keys.shape[1]) // kv_heads  # ggml lists the input dimension first

    def _fingerprint(self) -> str:
        digest = hashlib.blake2b(digest_size=32)
        for name in sorted(self._tensors):
            t = self._tensors[name]
            digest.update(f"{name}|{t.tensor_type.name}|{list(t.shape)}".encode())
            digest.update(memoryview(np.ascontiguousarray(t.data)).cast("B"))
        return digest.hexdigest()

    def _load(self, gguf_name: str) -> torch.Tensor:
        t = self._tensors[gguf_name]
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            array = np.array(t.data, dtype=np.float32)
        else:
            array = dequantize(t.data, t.tensor_type)
        # ggml lists dimensions fastest-first; numpy wants them slowest-first.
        shape = tuple(int(d) for d in reversed(t.shape))
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(shape))

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.config.num_hidden_layers:
            raise ModelSourceError(f"block {index} out of range [0, {self.config.num_hidden_layers})")
        out: dict[str, torch.Tensor] = {}
        cfg = self.config
        for gguf_suffix, hf_name in (_BLOCK_NAMES | dict(family_of(cfg).gguf_block_names)).items():
            gguf_name = f"blk.{index}.{gguf_suffix}"
            if gguf_name in self._tensors:
                out[hf_name] = self._load(gguf_name)
        if not family_of(cfg).gguf_rotary_permuted:
            return out
        for proj, heads in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads)):
            for kind in ("weight", "bias"):
                key = f"self_attn.{proj}.{kind}"
                if key in out:
                    out[key] = _unpermute_rotary_rows(out[key], heads)
        return out

    def client_tensors(self) -> dict[str, torch.Tensor]:
        out = {hf: self._load(g) for g, hf in _CLIENT_NAMES.items() if g in self._tensors}
        out.setdefault("lm_head.weight", out["embed_tokens.weight"])
        return out

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        saved = self._derived_dir() / "tokenizer"
        if (saved / "tokenizer_config.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(str(saved))
            except Exception:  # a damaged cache entry: rebuild it below
                shutil.rmtree(saved, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        tmp = saved.with_name(f"tokenizer.{os.getpid()}.tmp")
        try:
            tokenizer.save_pretrained(str(tmp))
            tmp.rename(saved)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race, or no disk
        return tokenizer
