"""What a PEFT ``adapter_config.json`` means for one projection: is it adapted, at what rank and scale.

petald reads PEFT's files itself (it never imports peft), so this file restates
peft's own rules (peft 0.21): ``target_modules`` as a list matches a module whose
name equals an entry or ends with ``.entry``, and only then honours
``layers_to_transform``; as a string it is a regex that must match the whole
name; ``rank_pattern`` and ``alpha_pattern`` keys are regexes matched against the
end of the name. Names are the module names in the model that was adapted, e.g.
``model.layers.3.self_attn.q_proj``.

Everything that would make the adapter compute something other than
``W x + scale * B A x`` on the seven block projections is refused here, with a
sentence that names the file and the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The projections of a Llama-family block that a LoRA may adapt, and where each lives in the block.
LORA_PROJECTIONS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
    "qkv_proj": "self_attn", "gate_up_proj": "mlp",  # Phi-3's, fused in the model itself
    # Falcon's and BLOOM's
    "query_key_value": "self_attention", "dense": "self_attention", "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp",
}

# Initialisations that change the base model's own weights: the adapter only fits that changed base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# Fields that, when set, turn LoRA into another computation (or adapt something besides the blocks).
_VARIANT_FIELDS = {
    "use_dora": "DoRA (use_dora) rescales each weight column by a learned magnitude",
    "fan_in_fan_out": "fan_in_fan_out stores weights for GPT-2 style Conv1D layers, which these models do not have",
    "modules_to_save": "modules_to_save replaces whole modules (often the LM head or embeddings, which live on the client)",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "layer_replication": "layer_replication changes how many blocks the model has",
    "target_parameters": "target_parameters adapts raw parameters rather than the projections",
    "trainable_token_indices": "trainable_token_indices retrains token embeddings, which live on the client",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) switches on only after certain tokens",
    "use_qalora": "QA-LoRA (use_qalora) pools the input before lora_A",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is another layout of the weights",
    "arrow_config": "Arrow (arrow_config) routes between several LoRAs per token",
    "velora_config": "VeLoRA (velora_config) is another LoRA variant",
    "kasa_config": "KaSA (kasa_config) is another LoRA variant",
    "monteclora_config": "MonteCLoRA (monteclora_config) is another LoRA variant",
}


class AdapterError(ValueError):
    """An adapter cannot be loaded or used; the message names the file and what to do."""


@dataclass(frozen=True)
class PeftLoraConfig:
    """The parts of a PEFT LoRA config that decide which projections are adapted and how strongly."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: list[str] | str | None
    exclude_modules: list[str] | str | None
    layers_to_transform: list[int] | int | None
    layers_pattern: list[str] | str | None

    def targets(self, module: str) -> bool:
        """Whether peft would have put a LoRA on the module named ``module``."""
        if self.exclude_modules:
            if isinstance(self.exclude_modules, str):
                if re.fullmatch(self.exclude_modules, module):
                    return False
            elif _named(module, self.exclude_modules):
                return False
        if self.target_modules is None:
            return False
        if isinstance(self.target_modules, str):
            if self.target_modules == "all-linear":
                return module.rsplit(".", 1)[-1] in LORA_PROJECTIONS
            return re.fullmatch(self.target_modules, module) is not None
        if not _named(module, self.target_modules):
            return False
        if self.layers_to_transform is None or self.layers_to_transform == []:
            return True
        layer = self._layer_index(module)
        if layer is None:
            return False
        if isinstance(self.layers_to_transform, int):
            return layer == self.layers_to_transform
        return layer in self.layers_to_transform

    def _layer_index(self, module: str) -> int | None:
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            match = None
            for pattern in patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
                if match is not None:
                    break
        return int(match.group("idx")) if match else None

    def rank(self, module: str) -> int:
        return int(self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r))

    def scaling(self, module: str) -> float:
        """The factor peft multiplies ``B A x`` by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        alpha = float(self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha))
        rank = self.rank(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def canonical(self) -> bytes:
        """The fields that change what the adapter computes, in a stable form (for fingerprints)."""
        fields = {k: v for k, v in self.__dict__.items() if k != "path"}
        for name in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"):
            if isinstance(fields[name], list):  # peft writes some of these from a set: their order is arbitrary
                fields[name] = sorted(fields[name])
        return json.dumps(fields, sort_keys=True).encode()


def _named(module: str, names: list[str]) -> bool:
    return module in names or any(module.endswith(f".{name}") for name in names)


def _pattern_key(patterns: dict[str, Any], module: str) -> str:
    """peft's ``get_pattern_key``: the first pattern that matches the end of the name (as a regex)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def read_peft_lora_config(path: Path) -> PeftLoraConfig:
    """Parse and check ``path`` (an adapter_config.json); refuse what petald cannot apply faithfully."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path.parent} is not a PEFT adapter: it has no adapter_config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path} should hold a JSON object, not {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type is {peft_type!r}; petald applies only LoRA adapters (peft_type \"LORA\")")
    for field, why in _VARIANT_FIELDS.items():
        if raw.get(field):
            raise AdapterError(f"{path}: {why}; petald applies plain LoRA only, so this adapter is refused "
                               f"(retrain or re-save it without {field})")
    bias = raw.get("bias", "none")
    if bias != "none":
        raise AdapterError(f"{path}: bias is {bias!r}; training biases changes the base model's own biases, "
                           "which petald's blocks keep frozen (use bias=\"none\")")
    init = str(raw.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise AdapterError(f"{path}: init_lora_weights is {init!r}, which also rewrites the base model's weights, so "
                           "the adapter fits only that rewritten model; convert it to a plain LoRA with peft's "
                           "save_pretrained(path_initial_model_for_weight_conversion=...) first")
    if init == "mica":
        raise AdapterError(f"{path}: init_lora_weights 'mica' selects the MiCA variant; petald applies plain LoRA only")
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        foreign = [t for t in targets if not isinstance(t, str) or t.rsplit(".", 1)[-1] not in LORA_PROJECTIONS]
        if foreign:
            raise AdapterError(f"{path}: target_modules {foreign} are outside the block projections petald can "
                               f"adapt ({', '.join(LORA_PROJECTIONS)})")
    elif targets is not None and not isinstance(targets, str):
        raise AdapterError(f"{path}: target_modules should be a list of names or a regex, not {targets!r}")
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"{path}: r should be a positive integer, not {r!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise AdapterError(f"{path}: lora_alpha should be a number, not {alpha!r}")
    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    for name, pattern, kind in (("rank_pattern", rank_pattern, int), ("alpha_pattern", alpha_pattern, int | float)):
        if not isinstance(pattern, dict) or not all(
                isinstance(v, kind) and not isinstance(v, bool) for v in pattern.values()):
            raise AdapterError(f"{path}: {name} should map module patterns to numbers, not {pattern!r}")
    if any(v <= 0 for v in rank_pattern.values()):
        raise AdapterError(f"{path}: rank_pattern holds a rank that is not positive: {rank_pattern}")
    return PeftLoraConfig(
        path=path, r=r, lora_alpha=float(alpha), use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=dict(rank_pattern), alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        target_modules=targets, exclude_modules=raw.get("exclude_modules"),
        layers_to_transform=raw.get("layers_to_transform"), layers_pattern=raw.get("layers_pattern"),
    )
