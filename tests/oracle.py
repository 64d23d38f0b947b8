"""The correctness oracle: transformers' own model on the same weights, and petald's greedy
decoding through one inference session, to compare with it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM

from petald.kernels.sampling import end_of_sequence_ids
from petald.kernels.sources.open_source import default_gguf_path, open_source

if TYPE_CHECKING:
    from petald.p2pnode.client.distributed_model import DistributedModel
    from petald.p2pnode.client.inference_session import InferenceSession
    from petald.p2pnode.routing.route import SpanRoute


@lru_cache(maxsize=4)
def reference_model(model_dir: str | None = None):
    if model_dir is None:
        path = default_gguf_path()
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(Path(model_dir)), dtype=torch.float32).eval()


@torch.no_grad()
def reference_greedy(model_dir: str | None, input_ids: torch.Tensor, max_new_tokens: int,
                     end_of_sequence: Sequence[int] = ()) -> list[int]:
    """transformers' model with its own KV cache, argmax at every step; stops after the first token
    in ``end_of_sequence`` (as petald's generate does), never when that is empty."""
    model = reference_model(model_dir)
    out = model(input_ids, use_cache=True)
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(int(nxt[0]))
        if tokens[-1] in end_of_sequence:
            break
        out = model(nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
    return tokens


def reference_text(model_dir: str | None, input_ids: torch.Tensor, max_new_tokens: int) -> str:
    """What ``petald generate`` prints for ``input_ids``: the greedy tokens up to the model's first
    end-of-sequence token, decoded."""
    source = open_source(model_dir)
    tokens = reference_greedy(model_dir, input_ids, max_new_tokens, end_of_sequence_ids(source.config.eos_token_id))
    return source.load_tokenizer().decode(tokens, skip_special_tokens=True)


@torch.no_grad()
def reference_logits(model_dir: str | None, input_ids: torch.Tensor) -> torch.Tensor:
    return reference_model(model_dir)(input_ids).logits


def greedy_through_session(model: DistributedModel, input_ids: torch.Tensor, new_tokens: int,
                           route: SpanRoute | None = None,
                           before_step: Callable[[int, InferenceSession], None] | None = None,
                           ) -> tuple[list[int], InferenceSession]:
    """petald's greedy tokens for ``input_ids`` [1, T], through one inference session of ``model``
    (over ``route``, or the one it picks) stepped by hand as ``generate`` steps it: the prompt, then
    each new token but the last. ``before_step(i, session)`` runs once the i-th new token is chosen,
    before it is sent (a test's fault goes there). Returns the tokens and the (closed) session, whose
    ``recoveries``, ``route`` and ``pushed_steps`` tell what happened."""
    tokens: list[int] = []
    with model.inference_session(1, input_ids.shape[1] + new_tokens, route) as session:
        hidden = model.node.call(session.step, model.head.embed(input_ids))
        for i in range(new_tokens):
            nxt = model.head.logits(hidden[:, -1]).argmax(-1)
            tokens.append(int(nxt[0]))
            if i + 1 == new_tokens:
                break
            if before_step is not None:
                before_step(i, session)
            hidden = model.node.call(session.step, model.head.embed(nxt[:, None]))
    return tokens, session
