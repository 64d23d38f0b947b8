"""The petald command line in tests: in this process through click's ``CliRunner`` (what most
tests need: arguments, messages, output), or as a real process where the process is what a test
is about (a server, the daemon, signals)."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner, Result

from petald.cli.main import cli

PETALD = [sys.executable, "-m", "petald.cli.main"]


def invoke(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    """``petald ARGS`` in this process; an exception petald did not turn into a message fails the test."""
    return CliRunner().invoke(cli, list(args), input=input, env=env, prog_name="petald", catch_exceptions=False)


def run_petald(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``petald ARGS`` as a process of its own."""
    return subprocess.run([*PETALD, *args], capture_output=True, text=True, timeout=timeout, env=env)


def assert_refused(result: Result, exit_code: int, message: str) -> None:
    """The command ended with ``message`` and nothing else on stderr: a usage error (exit 2) after
    click's usage lines, else (exit 1) the message alone."""
    assert result.exit_code == exit_code, result.output
    if exit_code == 2:
        assert result.stderr.startswith("Usage: petald "), result.stderr
        assert result.stderr.endswith(f"\nError: {message}\n"), result.stderr
    else:
        assert result.stderr == f"{message}\n"
