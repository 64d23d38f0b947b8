"""``petald chat``: an interactive conversation, through the local daemon or a client node of
its own. The whole history is sent each turn (the servers keep no state between turns).

Ctrl-C during an answer stops that answer at its next token and returns to the prompt (the
unanswered question is forgotten, the conversation before it kept); a second Ctrl-C while the
answer winds down, or one at the prompt, ends the chat."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from petald.cli.api.daemon_client import DaemonClient
from petald.cli.text_generation import (
    Sampling,
    StopAnswer,
    chat_prompt_ids,
    daemon_request,
    print_daemon_stream,
    print_generated,
    show,
)

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"
HELP = (f"{RESET_COMMAND} forgets the conversation, {EXIT_COMMANDS[0]} or Ctrl-D ends it, Ctrl-C stops an answer; "
        "a message that starts with / is sent as //message")

# (history, sampling, where to print, set to stop the answer) -> the answer's text
Reply = Callable[[list[dict[str, str]], Sampling, TextIO, threading.Event], str]


def reply_through_daemon(client: DaemonClient, model: str | None) -> Reply:
    """Answers from the daemon; ``model``: the model id to ask for (None: the daemon's)."""
    def reply(messages: list[dict[str, str]], sampling: Sampling, out: TextIO, stop: threading.Event) -> str:
        return print_daemon_stream(client, "/v1/chat/completions",
                                   {"messages": messages, **daemon_request(sampling, model)}, out, stop=stop)

    return reply


def reply_through_model(model: Any) -> Reply:
    """Answers from ``model``, a DistributedModel of this process."""
    def reply(messages: list[dict[str, str]], sampling: Sampling, out: TextIO, stop: threading.Event) -> str:
        new = print_generated(model, chat_prompt_ids(model.tokenizer, messages), sampling, out, stop=stop)
        return model.tokenizer.decode(new, skip_special_tokens=True)

    return reply


@contextlib.contextmanager
def ctrl_c_stops_the_answer(stop: threading.Event) -> Iterator[None]:
    """While an answer prints, the first Ctrl-C sets ``stop`` (the answer ends cleanly at its next
    token); a second one raises KeyboardInterrupt at once (a server that hangs must not trap the
    person). Outside the main thread signals cannot be caught: Ctrl-C then interrupts as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first_then_interrupt(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, first_then_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_chat(reply: Reply, sampling: Sampling, system: str | None, stdin: TextIO | None = None,
             out: TextIO | None = None) -> None:
    """Read a line, answer it, until end of input or /exit (stdin and stdout unless given)."""
    stdin, out = stdin or sys.stdin, out or sys.stdout  # looked up now: a test runner may replace them
    interactive = stdin.isatty()
    if interactive:
        out.write(f"petald chat: {HELP}\n")
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
        if text.startswith("/") and not text.startswith("//"):
            out.write(f"(unknown command {text.split()[0]}: {HELP})\n")
            continue
        history.append({"role": "user", "content": text[1:] if text.startswith("//") else text})
        stop = threading.Event()
        try:
            with ctrl_c_stops_the_answer(stop):
                answer = reply(history, sampling, out, stop)
        except StopAnswer:
            history.pop()
            show(out, "\n(answer stopped; that question is forgotten)\n")
            continue
        show(out, "\n")
        history.append({"role": "assistant", "content": answer})
