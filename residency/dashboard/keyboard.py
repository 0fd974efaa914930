"""Raw keyboard input for `residency play`: cbreak mode on the terminal, keys decoded to action names.

Cbreak (not raw) keeps Ctrl-C a signal; the saved terminal mode is restored on every exit path.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import tty
from collections.abc import Iterator

QUIT_KEYS = ("q", "Q", "\x04")  # q, or Ctrl-D
RESET_KEYS = ("r", "R")
ARROWS = {"A": "up", "B": "down", "C": "right", "D": "left"}
# WASD, arrows and the numeric keypad's layout (7 9 1 3 for diagonals); space and e are the action keys.
KEY_ACTIONS = {
    "w": "up", "a": "left", "s": "down", "d": "right",
    "8": "up", "4": "left", "2": "down", "6": "right", "5": "idle",
    "7": "up_left", "9": "up_right", "1": "down_left", "3": "down_right",
    " ": "jump", "e": "use", "i": "idle",
}  # fmt: skip
HELP = "arrows/WASD move · 7 9 1 3 diagonals · space jump · e use · r restart · q quit"


def decode(text: str) -> list[str]:
    """Split terminal input into keys: arrow escape sequences (CSI or SS3) become 'up' … ; the rest chars."""
    keys, i = [], 0
    while i < len(text):
        if text[i] == "\x1b" and i + 2 < len(text) and text[i + 1] in "[O" and text[i + 2] in ARROWS:
            keys.append(ARROWS[text[i + 2]])
            i += 3
        else:
            keys.append(text[i])
            i += 1
    return keys


def action_of(key: str, vocabulary: tuple[str, ...]) -> str | None:
    """The model action a key asks for, if the model knows it."""
    name = key if key in ARROWS.values() else KEY_ACTIONS.get(key.lower() if len(key) == 1 else key)
    return name if name in vocabulary else None


class Keyboard:
    """Keys typed on a terminal's stdin, read without blocking longer than asked."""

    def __init__(self, fd: int):
        self.fd = fd

    def read(self, timeout_s: float) -> list[str]:
        """Keys typed within `timeout_s` (returns as soon as any arrive; [] on timeout)."""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout_s))
        if not ready:
            return []
        data = os.read(self.fd, 1024)
        if not data:  # the terminal closed (e.g. an SSH session dropped): treat as quit
            return ["\x04"]
        return decode(data.decode("utf-8", errors="replace"))


@contextlib.contextmanager
def raw_keyboard(stream=None) -> Iterator[Keyboard]:
    """Cbreak mode with echo off for the block; the previous mode is restored even on exceptions."""
    fd = (stream or sys.stdin).fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield Keyboard(fd)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
