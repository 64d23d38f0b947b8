"""PEFT-format LoRA adapters for a span's blocks, applied as additive deltas to the fused projections.

A LoRA on projection ``W`` turns ``W x`` into ``W x + s * B (A x)``. The base
weights are never touched (they may be quantized, and other sessions use them
without the adapter): each block computes its fused projection as usual and adds
the adapter's delta, computed from the same input in the span's compute dtype.

The blocks fuse q/k/v into one projection and gate/up into another, so an
adapter's sub-projections are fused the same way: their A matrices are stacked
([in, r_q + r_k + r_v], one matmul), and their B matrices form one
block-diagonal [r_q + r_k + r_v, q + k + v] matrix (a second matmul) whose
zero blocks leave the columns of un-adapted sub-projections alone. The scale
``s`` is folded into B at load time. Two small matmuls per adapted group is what
a one-token decode step pays.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import PretrainedConfig

# AdapterError lives with the config rules (which raise it too); it is imported from here.
from petald.kernels.adapters.peft_lora_config import (
    LORA_PROJECTIONS,
    AdapterError,
    read_peft_lora_config,
)
from petald.kernels.models.dims import ModelDims
from petald.kernels.models.registry import family_of

# The block's fused projections.
LORA_GROUPS = ("qkv", "o", "gate_up", "down")


def lora_groups(config: PretrainedConfig) -> dict[str, tuple[str, ...]]:
    """The PEFT modules each of the block's fused projections is made of in this model, in their row order
    (``ModelFamily.qkv_projections``: Phi-3's q/k/v and gate/up are one module each). A mixture of
    experts' MLP (Mixtral's) is not adapted: its groups are attention's only. Falcon's and BLOOM's are their
    own module names (``query_key_value``, ``dense``, ``dense_h_to_4h`` for "gate_up", ``dense_4h_to_h``)."""
    family = family_of(config)

    def modules(names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(name.rsplit(".", 1)[-1] for name in names)

    groups = {"qkv": modules(family.qkv_projections), "o": modules((family.o_projection,))}
    if family.experts is None:
        groups |= {"gate_up": modules(family.gate_up_projections), "down": modules((family.down_projection,))}
    return groups


# peft writes ``base_model.model.<module>.lora_A.weight`` (the adapter's name is dropped on save;
# a raw state dict keeps it as ``lora_A.<name>.weight``); <module> is named as in the adapted model.
_KEY = re.compile(r"base_model\.model\.(?P<module>(?:(?:model\.)?layers|transformer\.h)\.(?P<layer>\d+)\.(?P<part>[^.]+)\."
                  r"(?P<proj>[^.]+))"
                  r"\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
_SAFETENSORS, _PICKLE = "adapter_model.safetensors", "adapter_model.bin"


class LoraGroup:
    """The LoRA of one fused projection: ``delta(h) = (h @ A_stacked) @ B_block_diagonal``."""

    def __init__(self, a_t: torch.Tensor, b: torch.Tensor):
        self.a_t = a_t  # [in, total rank]
        self.b = b  # [total rank, fused out width], scales folded in

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1]).to(self.a_t.dtype)
        return torch.mm(torch.mm(flat, self.a_t), self.b).view(*h.shape[:-1], -1).to(h.dtype)


@dataclass
class BlockLora:
    """One block's share of an adapter: the groups (``LORA_GROUPS``) that have any LoRA in this block."""

    index: int
    groups: dict[str, LoraGroup]

    def delta(self, group: str, h: torch.Tensor) -> torch.Tensor | None:
        """What the adapter adds to fused projection ``group``'s output for input ``h`` [..., in], or None.

        Plain torch ops: differentiable with respect to ``h``, and fine under inference mode.
        """
        if group not in LORA_GROUPS:
            raise ValueError(f"unknown projection group {group!r}: one of {', '.join(LORA_GROUPS)}")
        lora = self.groups.get(group)
        return None if lora is None else lora.delta(h)


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter, loaded for blocks [start, end) of one model."""

    name: str
    fingerprint: str  # over the adapter's whole content, whatever span it was loaded for
    path: Path
    start: int
    end: int
    dtype: torch.dtype
    device: torch.device
    blocks: dict[int, BlockLora] = field(default_factory=dict)

    def block(self, index: int) -> BlockLora | None:
        """The LoRA of global block ``index``, or None where the adapter leaves that block alone."""
        if not self.start <= index < self.end:
            raise ValueError(f"adapter {self.name!r} was loaded for blocks {self.start}:{self.end}, not block {index}")
        return self.blocks.get(index)


def projection_shapes(config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each block projection this model has."""
    dims = ModelDims.of(config)
    hidden, q, kv, inter = dims.hidden, dims.q_size, dims.kv_size, dims.intermediate
    every = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
             "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
             "qkv_proj": (hidden, q + 2 * kv), "gate_up_proj": (hidden, 2 * inter),
             # Falcon's and BLOOM's
             "query_key_value": (hidden, q + 2 * kv), "dense": (q, hidden), "dense_h_to_4h": (hidden, inter),
             "dense_4h_to_h": (inter, hidden)}
    return {proj: every[proj] for projs in lora_groups(config).values() for proj in projs}


def load_lora_adapter(path: str | Path, config: PretrainedConfig, start: int, end: int, dtype: torch.dtype,
                      device: torch.device, name: str | None = None) -> LoraAdapter:
    """Read the PEFT adapter directory ``path`` for blocks [start, end) of the model ``config`` describes.

    Every tensor is checked against the model (so an adapter trained for another model is refused),
    and hashed into the fingerprint; only the blocks in [start, end) are kept.
    """
    if not 0 <= start < end <= config.num_hidden_layers:
        raise ValueError(f"blocks {start}:{end} are not a span of this model's {config.num_hidden_layers} blocks")
    path = Path(path).expanduser()
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise AdapterError(f"adapter {path} {what}: give a directory saved by peft's save_pretrained "
                           "(adapter_config.json and adapter_model.safetensors)")
    name = path.resolve().name if name is None else name
    if not _NAME.fullmatch(name):
        raise AdapterError(f"adapter name {name!r} (for {path}) should be 1-100 letters, digits, '.', '_', '+' or "
                           "'-', starting with a letter or digit: rename the directory or give a name")
    lora_config = read_peft_lora_config(path / "adapter_config.json")
    shapes = projection_shapes(config)
    digest = hashlib.sha256(lora_config.canonical())
    pieces: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # (block, proj) -> {"A": ..., "B": ...}
    seen: dict[tuple[int, str], set[str]] = {}  # over every block, for the checks
    modules: dict[tuple[int, str], str] = {}  # (block, proj) -> the module's name in the adapted model
    weights_file, tensors = _tensors(path)
    for key, tensor in tensors:
        digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterError(f"{weights_file} holds {key}, which is not a LoRA weight of a block projection "
                               f"({', '.join(LORA_PROJECTIONS)}); petald adapts only those")
        module, layer, proj, ab = match["module"], int(match["layer"]), match["proj"], match["ab"]
        if LORA_PROJECTIONS.get(proj) != match["part"]:
            raise AdapterError(f"{weights_file} holds {key}: {match['part']}.{proj} is not a projection petald "
                               f"can adapt ({', '.join(LORA_PROJECTIONS)})")
        if proj not in shapes:
            raise AdapterError(f"{weights_file} holds {key}, but this {config.model_type} model has no {proj} "
                               f"(its block projections: {', '.join(shapes)}): the adapter was trained for another "
                               "model")
        if layer >= config.num_hidden_layers:
            raise AdapterError(f"{weights_file} adapts block {layer}, but the model has "
                               f"{config.num_hidden_layers} blocks: this adapter was trained for another model")
        if not lora_config.targets(module):
            continue  # peft itself would not load it: the config does not target this module
        if ab in seen.setdefault((layer, proj), set()):
            raise AdapterError(f"{weights_file} holds two lora_{ab} weights for {module}")
        seen[(layer, proj)].add(ab)
        modules[(layer, proj)] = module
        rank, (in_features, out_features) = lora_config.rank(module), shapes[proj]
        want = (rank, in_features) if ab == "A" else (out_features, rank)
        if tuple(tensor.shape) != want:
            raise AdapterError(f"{weights_file}: {key} has shape {list(tensor.shape)}, but this model "
                               f"({config.model_type}, hidden size {config.hidden_size}) with rank {rank} needs "
                               f"{list(want)}: the adapter was trained for another model, or its rank_pattern "
                               "does not match its weights")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise AdapterError(f"{weights_file}: {key} holds non-finite or non-float values; the adapter is broken")
        if start <= layer < end:
            pieces.setdefault((layer, proj), {})[ab] = tensor
    for (layer, proj), got in sorted(seen.items()):
        if got != {"A", "B"}:
            missing = ({"A", "B"} - got).pop()
            raise AdapterError(f"{weights_file} has no lora_{missing} weight for layers.{layer} {proj}")
    if not seen:
        raise AdapterError(f"{weights_file} holds no LoRA weight that {path / 'adapter_config.json'} targets "
                           "in this model's blocks: nothing to apply")
    adapter = LoraAdapter(name, digest.hexdigest()[:32], path, start, end, dtype, device)
    with torch.inference_mode(False):  # plain tensors, so that autograd may save them for backward later
        for layer in sorted({layer for layer, _ in pieces}):
            groups = {}
            for group, projs in lora_groups(config).items():
                members = [(p, pieces[(layer, p)], lora_config.scaling(modules[(layer, p)]))
                           for p in projs if (layer, p) in pieces]
                if members:  # a fused q/k/v's columns in the order the block holds its rows (Falcon, BLOOM)
                    order = family_of(config).qkv_row_order(config) if group == "qkv" else None
                    groups[group] = _fused_group(members, projs, shapes, dtype, device, order)
            adapter.blocks[layer] = BlockLora(layer, groups)
    return adapter


def _fused_group(members: list[tuple[str, dict[str, torch.Tensor], float]], projs: tuple[str, ...],
                 shapes: dict[str, tuple[int, int]], dtype: torch.dtype, device: torch.device,
                 order: torch.Tensor | None = None) -> LoraGroup:
    """Stack the A matrices of a group's adapted projections and lay their scaled Bs block-diagonally, the
    fused output's columns permuted by ``order`` where the block's projection is (``qkv_row_order``)."""
    total_rank = sum(pair["A"].shape[0] for _, pair, _ in members)
    columns, offset = {}, 0
    for p in projs:  # every sub-projection has its columns in the fused output, adapted or not
        columns[p] = offset
        offset += shapes[p][1]
    a = torch.cat([pair["A"].float() for _, pair, _ in members])
    b = torch.zeros(total_rank, offset)
    row = 0
    for p, pair, scaling in members:
        rank, width = pair["A"].shape[0], shapes[p][1]
        b[row : row + rank, columns[p] : columns[p] + width] = pair["B"].float().t() * scaling
        row += rank
    if order is not None:
        b = b[:, order]
    return LoraGroup(a.t().contiguous().to(device, dtype), b.to(device, dtype))


def _tensors(path: Path) -> tuple[Path, Iterator[tuple[str, torch.Tensor]]]:
    """The adapter's weights file and its tensors in key order (read one at a time from safetensors)."""
    if (path / _SAFETENSORS).is_file():
        file = path / _SAFETENSORS
        try:
            handle = safe_open(str(file), "pt")
        except (SafetensorError, OSError) as exc:
            raise AdapterError(f"{file} cannot be read as safetensors: {exc}") from None

        def read() -> Iterator[tuple[str, torch.Tensor]]:
            with handle as f:
                for key in sorted(f.keys()):
                    yield key, f.get_tensor(key)

        return file, read()
    if (path / _PICKLE).is_file():
        file = path / _PICKLE
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad or unsafe pickle
            raise AdapterError(f"{file} cannot be loaded as plain tensors (torch.load with weights_only): "
                               f"{exc}") from None
        if not isinstance(state, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise AdapterError(f"{file} should hold a dict of tensors by name")
        return file, iter(sorted(state.items()))
    raise AdapterError(f"adapter {path} has no weights: expected {_SAFETENSORS} (or {_PICKLE}) beside "
                       "adapter_config.json")
