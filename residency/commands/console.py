"""The rich Console every command prints through: terminal width on a TTY, $COLUMNS or 120 columns otherwise.

Rich falls back to 80 columns when stdout is a pipe or file, which truncates our wide tables.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from rich.console import Console

PIPE_WIDTH = 120


def make_console(stderr: bool = False) -> Console:
    """A Console on stdout (or stderr): the terminal's width; piped, $COLUMNS or else PIPE_WIDTH columns for tables,
    and lines of prose left whole (soft wrap): hard-wrapped at the width, a number was cut from its unit
    ("107.6 \nKiB") and a message split where grep could not find it."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        columns = os.environ.get("COLUMNS", "")
        width = int(columns) if columns.isdigit() and int(columns) > 0 else PIPE_WIDTH
        console = Console(stderr=stderr, width=width, soft_wrap=True)
    return console


def command_name() -> str:
    """How the user can type `residency` here, for the commands we print: the bare name when the shell finds it,
    else the script beside this interpreter (the README's .venv/bin/residency, relative to the working directory
    when under it), else `python -m residency`. A printed next step that does not run is a dead end."""
    if shutil.which("residency"):
        return "residency"
    script = Path(sys.executable).parent / "residency"
    if script.is_file():
        try:
            return os.path.relpath(script) if not os.path.relpath(script).startswith("..") else str(script)
        except ValueError:  # another drive (Windows)
            return str(script)
    return f"{Path(sys.executable).name} -m residency"


def working(text: str):
    """A spinner on stderr saying what a long step is doing ("tracing the forward of a 4096-layer model" takes a
    minute), gone when it ends; nothing off a terminal (a log or a pipe gets no control codes)."""
    import contextlib

    err = make_console(stderr=True)
    return err.status(text, spinner="dots") if err.is_terminal else contextlib.nullcontext()
