"""``--quant auto`` and ``--head-quant auto``: the fastest way this CPU can store the blocks' (or the LM
head's) weights whose greedy choices still agree with float32's.

Each candidate mode is timed side by side with the others (one decode step of one block, or one head
call, the modes taking turns so that a noisy machine slows them alike) and its top-1 agreement with
float32 measured on the reference text (``reference_text.txt`` beside this file, its first
``REFERENCE_TOKENS`` tokens, teacher-forced through the whole model). A mode under
``AGREEMENT_BOUND`` is never chosen; among the others the fastest is, and "none" (exact) is always a
candidate.

The whole model runs for the agreement, one block at a time (never more than one block of each mode
in memory), so a server holding a few blocks of a large model reads the whole file once for it:
agreements are cached per model, dtype and kernel (``quant_choice.json`` in the cache directory),
the timings are taken at every start (about a second).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from petald.kernels.cache_dir import petald_cache_dir, read_json, write_json
from petald.kernels.client_head import ClientHead
from petald.kernels.quant import QuantError, check_quant, native_bfloat16_matmul
from petald.kernels.sources.model_source import ModelSource, ModelSourceError
from petald.kernels.span import BlockSpan
from petald.kernels.throughput import KERNELS_REVISION, kernel_of

REFERENCE_TEXT = Path(__file__).with_name("reference_text.txt")
REFERENCE_TOKENS = 256
AGREEMENT_BOUND = 0.97  # top-1 agreement with float32 a chosen mode must reach on the reference text
TIMED_ROUNDS = 40  # each mode's timed calls, in turns with the other modes
EXACT = "none"


@dataclass(frozen=True)
class MeasuredMode:
    mode: str
    seconds: float  # median time of one decode step of one block (or of one LM head call)
    agreement: float  # top-1 agreement with float32 on the reference text


@dataclass(frozen=True)
class QuantChoice:
    chosen: str
    measured: tuple[MeasuredMode, ...]

    def describe(self, what: str) -> str:
        """One line for the operator: what was chosen and why, every candidate's figures."""
        base = next(m.seconds for m in self.measured if m.mode == EXACT)
        figures = "; ".join(f"{m.mode} {m.seconds / base:.2f}x time, {100 * m.agreement:.1f}% top-1"
                            + ("" if m.agreement >= AGREEMENT_BOUND else " (under the bound)")
                            for m in self.measured)
        return (f"{what} auto: {self.chosen} (fastest with >= {100 * AGREEMENT_BOUND:.0f}% top-1 agreement with "
                f"float32 on the reference text; {figures})")


def choose(measured: Sequence[MeasuredMode], bound: float = AGREEMENT_BOUND) -> str:
    """The fastest mode that agrees enough; "none" whenever nothing else does."""
    allowed = [m for m in measured if m.agreement >= bound or m.mode == EXACT]
    return min(allowed, key=lambda m: m.seconds).mode


def reference_ids(source: ModelSource, tokens: int = REFERENCE_TOKENS) -> torch.Tensor:
    """The reference text's first ``tokens`` token ids [1, n]; a source without a tokenizer (a bare
    checkpoint) gets seeded random ids instead, which still compare the modes' arithmetic."""
    try:
        ids = source.load_tokenizer()(REFERENCE_TEXT.read_text(), return_tensors="pt").input_ids
    except ModelSourceError:
        ids = torch.randint(0, source.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    return ids[:, :tokens]


class _LastBlockTensors:
    """``source``, with the last block read kept: every mode's copy of a block is built from one read."""

    def __init__(self, source: ModelSource):
        self.source, self.config, self.identity = source, source.config, source.identity
        self._last: tuple[int, dict[str, torch.Tensor]] | None = None

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        if self._last is None or self._last[0] != index:
            self._last = (index, self.source.block_tensors(index))
        return self._last[1]


def final_hiddens(source: ModelSource, ids: torch.Tensor, modes: dict[str, tuple[torch.dtype, str]],
                  device: torch.device, progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """The last block's output for ``ids`` in each of ``modes`` (label -> (dtype, weight mode)), the blocks
    read one at a time and each run in every mode before the next is read."""
    embedded = ClientHead(source, device=device).embed(ids)
    hidden = {label: embedded.to(dtype) for label, (dtype, _) in modes.items()}
    blocks = _LastBlockTensors(source)
    total = source.identity.num_blocks
    for index in range(total):
        for label, (dtype, quant) in modes.items():
            block = BlockSpan(blocks, index, index + 1, dtype, device, quant=quant)  # type: ignore[arg-type]
            hidden[label] = block.forward(hidden[label], block.new_cache(1, ids.shape[1]))
        if progress is not None:
            progress(index + 1, total)
    return {label: h.float() for label, h in hidden.items()}


def _agreement(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.argmax(-1) == want.argmax(-1)).float().mean().item()


def _timed_in_turns(calls: dict[str, Callable[[], object]], rounds: int = TIMED_ROUNDS) -> dict[str, float]:
    """Each call's median time, the calls taking turns (after one warm-up each)."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {mode: [] for mode in calls}
    for _ in range(rounds):
        for mode, call in calls.items():
            began = time.perf_counter()
            call()
            times[mode].append(time.perf_counter() - began)
    return {mode: statistics.median(t) for mode, t in times.items()}


class _AgreementCache:
    """Agreements by key, kept in ``quant_choice.json`` (cache_dir's rules: unreadable is empty)."""

    def __init__(self) -> None:
        self.path = petald_cache_dir() / "quant_choice.json"
        data = read_json(self.path)
        self.entries: dict[str, float] = data if isinstance(data, dict) else {}

    def get(self, key: str) -> float | None:
        value = self.entries.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    def put(self, key: str, value: float) -> None:
        self.entries[key] = value
        write_json(self.path, self.entries)


def block_quant_candidates(device: torch.device) -> list[str]:
    """The weight modes this device can run ("none" first)."""
    modes = [EXACT]
    for mode in ("int8", "int4", "nf4"):
        try:
            check_quant(mode, device)
        except QuantError:
            continue
        modes.append(mode)
    return modes


def _block_step_seconds(source: ModelSource, dtype: torch.dtype,
                        device: torch.device) -> tuple[dict[str, float], dict[str, str]]:
    """Each runnable mode's decode-step time on one block (the middle one, 256 tokens of context),
    and which kernels served it (``throughput.kernel_of``)."""
    middle = source.identity.num_blocks // 2
    spans = {}
    for mode in block_quant_candidates(device):
        try:
            spans[mode] = BlockSpan(source, middle, middle + 1, dtype, device, quant=mode)
        except QuantError:  # this model's shapes do not suit the mode's kernel
            continue
    width = source.config.hidden_size
    context = torch.randn(1, 256, width, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    caches = {mode: span.new_cache(1, 512) for mode, span in spans.items()}
    for mode, span in spans.items():
        span.forward(context, caches[mode])

    def step(mode: str) -> Callable[[], object]:
        def run() -> object:
            caches[mode].length = 256  # the same context at every call
            return spans[mode].forward(context[:, :1], caches[mode])
        return run

    seconds = _timed_in_turns({mode: step(mode) for mode in spans})
    return seconds, {mode: kernel_of(span, mode) for mode, span in spans.items()}


def choose_block_quant(source: ModelSource, dtype: torch.dtype, device: torch.device,
                       progress: Callable[[str], None] | None = None) -> QuantChoice:
    """``--quant auto`` for a server computing in ``dtype`` on ``device``."""
    seconds, kernels = _block_step_seconds(source, dtype, device)
    modes = list(seconds)
    keys = {mode: "|".join(["blocks", source.identity.fingerprint, str(dtype), device.type, kernels[mode],
                            torch.__version__, f"kernels {KERNELS_REVISION}", f"{REFERENCE_TOKENS} tokens"])
            for mode in modes}
    cache = _AgreementCache()
    missing = [m for m in modes if m != EXACT and cache.get(keys[m]) is None]
    if missing:
        runs = {"float32": (torch.float32, EXACT), **{mode: (dtype, mode) for mode in missing}}
        what = f"checking {', '.join(missing)} blocks against float32 on the reference text"
        hidden = final_hiddens(source, reference_ids(source), runs, device, _blocks_progress(progress, what))
        head = ClientHead(source, device=device)
        want = head.logits(hidden["float32"])
        for mode in missing:
            cache.put(keys[mode], _agreement(head.logits(hidden[mode]), want))
    measured = tuple(MeasuredMode(m, seconds[m], 1.0 if m == EXACT else cache.get(keys[m])) for m in modes)
    return QuantChoice(choose(measured), measured)


def head_quant_candidates(device: torch.device) -> list[str]:
    """The LM head storages this device runs fast enough to consider ("none" first; "bf16" only
    where bfloat16 is native, elsewhere ClientHead would fall back to "none")."""
    modes = [m for m in block_quant_candidates(device) if m != "nf4"]
    if device.type != "cpu" or native_bfloat16_matmul():
        modes.append("bf16")
    return modes


def choose_head_quant(source: ModelSource, device: torch.device,
                      progress: Callable[[str], None] | None = None) -> QuantChoice:
    """``--head-quant auto`` for a client on ``device`` (float32 embeddings and logits)."""
    heads = {}
    for mode in head_quant_candidates(device):
        try:
            heads[mode] = ClientHead(source, device=device, quant=mode)
        except QuantError:
            continue
    modes = list(heads)
    hidden = torch.randn(1, 1, source.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(device)
    seconds = _timed_in_turns({mode: (lambda head=head: head.logits(hidden)) for mode, head in heads.items()})
    keys = {mode: "|".join(["head", source.identity.fingerprint, device.type, heads[mode].quant,
                            type(heads[mode].lm_head).__name__,
                            getattr(getattr(heads[mode].lm_head, "kernel", None), "isa", "torch"),
                            torch.__version__, f"kernels {KERNELS_REVISION}", f"{REFERENCE_TOKENS} tokens"])
            for mode in modes}
    cache = _AgreementCache()
    missing = [m for m in modes if m != EXACT and cache.get(keys[m]) is None]
    if missing:
        what = f"checking a {', '.join(missing)} LM head against float32 on the reference text"
        hidden_states = final_hiddens(source, reference_ids(source), {EXACT: (torch.float32, EXACT)}, device,
                                      _blocks_progress(progress, what))[EXACT]
        want = heads[EXACT].logits(hidden_states)
        for mode in missing:
            cache.put(keys[mode], _agreement(heads[mode].logits(hidden_states), want))
    measured = tuple(MeasuredMode(m, seconds[m], 1.0 if m == EXACT else cache.get(keys[m])) for m in modes)
    return QuantChoice(choose(measured), measured)


def resolved_head_quant(source: ModelSource, mode: str, say: Callable[[str], None]) -> str:
    """``mode``, or for "auto" the CPU head's choice (``choose_head_quant``), told through ``say``."""
    if mode != "auto":
        return mode
    choice = choose_head_quant(source, torch.device("cpu"), say)
    say(choice.describe("--head-quant"))
    return choice.chosen


def _blocks_progress(progress: Callable[[str], None] | None, what: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None

    def say(done: int, total: int) -> None:
        if done == total or done % max(1, total // 4) == 0:
            progress(f"{what}: block {done}/{total}")
    return say
