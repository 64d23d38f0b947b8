"""Text generated for a person to read, printed as it comes: through a DistributedModel of this
process, or through the local daemon's API. ``petald generate``, ``chat`` and ``demo`` all go
through here, so the sampling settings, the end-of-sequence rule and the printing are written once.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from petald.cli.logs import STDOUT_LINE
from petald.cli.text_assembler import TextAssembler

if TYPE_CHECKING:
    from petald.cli.api.daemon_client import DaemonClient


@dataclass
class GenerationStats:
    """What ``--stats`` says after a generation: tokens, speed, time to the first token, route."""

    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    tokens: int = 0
    route: str = ""  # the servers it ran through, or how it was reached
    ended: float | None = None
    speculation: str = ""  # what speculative decoding did, where it ran here

    def token(self) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
        self.tokens += 1

    def summary(self) -> str:
        elapsed = (self.ended or time.perf_counter()) - self.started
        # Speed after the first token: the steady decode rate, not diluted by the prompt's prefill.
        decoding = elapsed - (self.first_token_s or 0.0)
        rate = (self.tokens - 1) / decoding if self.tokens > 1 and decoding > 0 else 0.0
        first = f"{self.first_token_s:.2f} s" if self.first_token_s is not None else "none"
        return (f"petald: {self.tokens} tokens in {elapsed:.2f} s, {rate:.1f} tokens/s after the first "
                f"(first token after {first}); route: {self.route or 'unknown'}{self.speculation}")


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int | None
    speculate: int = 0  # draft and verify up to this many tokens a trip (0: plain decoding)
    drafter: Any = None  # what drafts them (None: prompt lookup; kernels/drafters/)


class StopAnswer(Exception):
    """Ctrl-C during an answer (``chat``): it ends at the next token, its session closed as after any answer."""


def check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise StopAnswer


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> Any:
    """The token ids [1, T] of a conversation, in the model's chat template, ready for the answer."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def print_generated(model: Any, ids: Any, sampling: Sampling, out: TextIO,
                    stats: GenerationStats | None = None, stop: threading.Event | None = None) -> list[int]:
    """Generate after ``ids`` (token ids [1, T]) with ``model`` (a DistributedModel), writing the
    text to ``out`` as tokens arrive; returns the new token ids. ``stats``: counted into; ``stop``
    set: StopAnswer at the next token."""
    from petald.kernels.sampling import end_of_sequence_ids

    tokenizer = model.tokenizer
    text = TextAssembler(lambda new: tokenizer.decode(new, skip_special_tokens=True), stop=())

    def print_token(column: Any) -> None:
        check_stop(stop)
        if stats is not None:
            stats.token()
        show(out, text.add(int(column[0])))

    result = model.generate(ids, max_new_tokens=sampling.max_new_tokens, do_sample=sampling.temperature > 0,
                            temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                            eos_token_id=end_of_sequence_ids(model.config.eos_token_id, tokenizer.eos_token_id),
                            streamer=print_token, speculate=sampling.speculate, drafter=sampling.drafter)
    if stats is not None:
        stats.ended = time.perf_counter()
        stats.route = model.last_route.describe() if model.last_route is not None else ""
        spec = model.last_speculation if sampling.speculate else None
        if spec is not None:
            stats.speculation = (f"; speculation: {spec.acceptance_rate:.0%} of {spec.drafted} drafts kept, "
                                 f"{spec.tokens_per_step:.2f} tokens a trip, K {spec.mean_k:.1f} on average")
    return result[0, ids.shape[1]:].tolist()


def generate_text(model: Any, prompt: str, sampling: Sampling, chat: bool, out: TextIO | None = None,
                  stats: GenerationStats | None = None) -> list[int]:
    """Tokenize ``prompt`` (in the chat template with ``chat``), generate through ``model`` (a
    DistributedModel), print the text and end the line; returns the new token ids."""
    out = out or sys.stdout  # looked up now: a caller (click's test runner) may have replaced it
    tokenizer = model.tokenizer
    if chat:
        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    new = print_generated(model, ids, sampling, out, stats)
    show(out, "\n")
    return new


def show(out: TextIO, text: str) -> None:
    """Print streamed text now, noting for the log whether its line is left open (``logs.py``)."""
    out.write(text)
    out.flush()
    STDOUT_LINE.wrote(text)


def daemon_request(sampling: Sampling, model: str | None) -> dict[str, Any]:
    """The sampling fields of a request to the daemon's OpenAI endpoints; ``model``: the model id
    to ask for (None: whatever the daemon serves)."""
    body: dict[str, Any] = {"max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                            "top_p": sampling.top_p}
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.speculate:
        body["speculate"] = sampling.speculate
    if model is not None:
        body["model"] = model
    return body


def print_daemon_stream(daemon: DaemonClient, path: str, body: dict[str, Any], out: TextIO,
                        stats: GenerationStats | None = None, stop: threading.Event | None = None) -> str:
    """POST ``body`` to the daemon's ``path``, writing the text to ``out`` as it streams; returns it all.
    ``stats``: the first piece's time, and the tokens the daemon counted."""
    pieces = []
    for piece in daemon.stream(path, body):  # leaving it early closes the request: the daemon stops generating
        check_stop(stop)
        if stats is not None and stats.first_token_s is None:
            stats.token()
        pieces.append(piece)
        show(out, piece)
    if stats is not None:
        stats.ended = time.perf_counter()
        stats.tokens = (daemon.last_usage or {}).get("completion_tokens", stats.tokens)
        stats.route = f"through the local daemon at {daemon.socket_path}"
    return "".join(pieces)
