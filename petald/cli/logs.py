"""What a command tells the person running it, besides its output: log records, and the
announcements of a long-running command (stdout and systemd's status line)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TextIO

import click


class StreamedLine:
    """Whether text streamed to stdout (a generation under way) has left its line open: a log
    line written then would land in the middle of the text on a terminal."""

    def __init__(self) -> None:
        self.open = False

    def wrote(self, text: str) -> None:
        if text:
            self.open = not text.endswith("\n")


STDOUT_LINE = StreamedLine()  # what petald's commands print as generated text


class OwnLineHandler(logging.StreamHandler):
    """Log records on stderr, each on a line of its own: while streamed text has left its line
    open, a record starts with a newline (the text goes on below it, on a fresh line)."""

    def __init__(self, stream: TextIO | None = None, line: StreamedLine = STDOUT_LINE):
        super().__init__(stream)
        self.line = line

    def emit(self, record: logging.LogRecord) -> None:
        if self.line.open:
            self.line.open = False  # the terminal's cursor is at a line's start again after this record
            self.stream.write("\n")
        super().emit(record)


def setup_logging(verbose: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # journald stamps every line itself; elsewhere a log line carries its own time.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format=f"{stamp}%(levelname)s %(name)s: %(message)s", handlers=[OwnLineHandler()])


def announcer() -> Callable[[str], None]:
    """Print ``petald: TEXT`` and tell systemd (STATUS=, shown by systemctl status)."""
    from petald.cli.systemd import notify as systemd_notify

    def say(text: str) -> None:
        click.echo(f"petald: {text}")
        systemd_notify.status(text)

    return say
