"""What both command-line tools share: output format and secret input."""

from __future__ import annotations

import sys
from typing import Callable

import click


def format_option(f: Callable) -> Callable:
    return click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
                        show_default=True, help="Output format (json for scripts).")(f)


def read_password(prompt: str, *, from_stdin: bool, confirm: bool = False) -> str:
    """A password from the next line of standard input (``--password-stdin``,
    the non-interactive twin) or from a hidden prompt on the terminal."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise click.UsageError("no terminal to prompt on: pass --password-stdin and pipe the password")
    return click.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True)
