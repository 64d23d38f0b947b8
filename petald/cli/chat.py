"""``petald chat``: an interactive conversation, through the local daemon or a client node of
its own. The whole history is sent each turn (the servers keep no state between turns)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from petald.cli.api.daemon_client import DaemonClient

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None


Reply = Callable[[list[dict[str, str]], Sampling, TextIO], str]


def reply_through_daemon(client: DaemonClient, model: str | None) -> Reply:
    def reply(messages: list[dict[str, str]], sampling: Sampling, out: TextIO) -> str:
        body: dict[str, Any] = {"messages": messages, "max_tokens": sampling.max_new_tokens,
                                "temperature": sampling.temperature, "top_p": sampling.top_p}
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if model is not None:
            body["model"] = model
        pieces = []
        for piece in client.stream("/v1/chat/completions", body):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        return "".join(pieces)

    return reply


def reply_through_model(model: Any) -> Reply:
    """``model``: a DistributedModel of this process."""
    from petald.cli.main import TokenPrinter

    def reply(messages: list[dict[str, str]], sampling: Sampling, out: TextIO) -> str:
        tokenizer = model.tokenizer
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        printer = TokenPrinter(tokenizer, out)
        eos = sorted({t for t in (model.config.eos_token_id, tokenizer.eos_token_id) if isinstance(t, int)})
        result = model.generate(ids, max_new_tokens=sampling.max_new_tokens, do_sample=sampling.temperature > 0,
                                temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                                eos_token_id=eos, streamer=printer)
        return tokenizer.decode(result[0, ids.shape[1]:].tolist(), skip_special_tokens=True)

    return reply


def run_chat(reply: Reply, sampling: Sampling, system: str | None, stdin: TextIO = sys.stdin,
             out: TextIO = sys.stdout) -> None:
    """Read a line, answer it, until end of input or /exit."""
    interactive = stdin.isatty()
    if interactive:
        out.write(f"petald chat: {RESET_COMMAND} forgets the conversation, {EXIT_COMMANDS[0]} or Ctrl-D ends it\n")
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        if interactive:
            out.write("\n> ")
            out.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            break
        if text == RESET_COMMAND:
            history = history[:1] if system else []
            out.write("(conversation forgotten)\n")
            continue
        history.append({"role": "user", "content": text})
        answer = reply(history, sampling, out)
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": answer})
