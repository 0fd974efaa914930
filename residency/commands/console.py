"""The rich Console every command prints through: terminal width on a TTY, 120 columns otherwise.

Rich falls back to 80 columns when stdout is a pipe or file, which truncates our wide tables.
"""

from __future__ import annotations

from rich.console import Console

PIPE_WIDTH = 120


def make_console(stderr: bool = False) -> Console:
    """A Console on stdout (or stderr): the terminal's width, or PIPE_WIDTH columns when piped."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=PIPE_WIDTH)
    return console
