"""``petald chat``: an interactive conversation, through the local daemon or a client node of
its own. The whole history is sent each turn (the servers keep no state between turns)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from petald.cli.api.daemon_client import DaemonClient
from petald.cli.text_generation import (
    Sampling,
    chat_prompt_ids,
    daemon_request,
    print_daemon_stream,
    print_generated,
    show,
)

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"

Reply = Callable[[list[dict[str, str]], Sampling, TextIO], str]


def reply_through_daemon(client: DaemonClient, model: str | None) -> Reply:
    """Answers from the daemon; ``model``: the model id to ask for (None: the daemon's)."""
    def reply(messages: list[dict[str, str]], sampling: Sampling, out: TextIO) -> str:
        return print_daemon_stream(client, "/v1/chat/completions",
                                   {"messages": messages, **daemon_request(sampling, model)}, out)

    return reply


def reply_through_model(model: Any) -> Reply:
    """Answers from ``model``, a DistributedModel of this process."""
    def reply(messages: list[dict[str, str]], sampling: Sampling, out: TextIO) -> str:
        new = print_generated(model, chat_prompt_ids(model.tokenizer, messages), sampling, out)
        return model.tokenizer.decode(new, skip_special_tokens=True)

    return reply


def run_chat(reply: Reply, sampling: Sampling, system: str | None, stdin: TextIO | None = None,
             out: TextIO | None = None) -> None:
    """Read a line, answer it, until end of input or /exit (stdin and stdout unless given)."""
    stdin, out = stdin or sys.stdin, out or sys.stdout  # looked up now: a test runner may replace them
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
        show(out, "\n")
        history.append({"role": "assistant", "content": answer})
