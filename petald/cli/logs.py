"""What a command tells the person running it, besides its output: log records, and the
announcements of a long-running command (stdout and systemd's status line)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import click


def setup_logging(verbose: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # journald stamps every line itself; elsewhere a log line carries its own time.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format=f"{stamp}%(levelname)s %(name)s: %(message)s")


def announcer() -> Callable[[str], None]:
    """Print ``petald: TEXT`` and tell systemd (STATUS=, shown by systemctl status)."""
    from petald.cli.systemd import notify as systemd_notify

    def say(text: str) -> None:
        click.echo(f"petald: {text}")
        systemd_notify.status(text)

    return say
