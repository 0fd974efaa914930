"""`residency play` in a pseudo-terminal: keystrokes drive the session, frames change, q exits with 0."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CELL = re.compile(rb"\x1b\[[0-9;]*38;2;\d+;\d+;\d+;48;2;\d+;\d+;\d+m")  # one half-block cell's colours
NEVER = re.compile(rb"(?!)")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("play")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "start.png")
    return d


def spawn(argv: list[str], cols: int = 160, rows: int = 50, **env_more: str) -> tuple[int, int]:
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its terminal
        os.chdir(ROOT)
        # pytest exports COLUMNS/LINES, which rich prefers to the terminal's size: give the pty's.
        env = {**os.environ, "COLUMNS": str(cols), "LINES": str(rows), **env_more}
        os.execve(sys.executable, [sys.executable, "-m", "residency", *argv], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    return pid, fd


def read_until(fd: int, pattern: re.Pattern, deadline_s: float, out: bytearray) -> re.Match | None:
    while time.monotonic() < deadline_s:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                return None
            if not chunk:
                return None
            out += chunk
            found = list(pattern.finditer(out))
            if found:
                return found[-1]
    return None


def screen_text(out: bytearray) -> str:
    """The last screens without escape codes, for failure messages."""
    return re.sub(rb"\x1b\[[0-9;?]*[a-zA-Z]", b"", bytes(out[-30000:])).decode(errors="replace")[-1500:]


def test_keys_drive_the_session_and_q_exits_cleanly(files):
    pid, fd = spawn(["play", "tiny", "--image", str(files / "start.png"), "--profile", "rx-7800-xt",
                     "--fps", "30"])
    out = bytearray()
    deadline, done = time.monotonic() + 60, 0  # generous: a loaded 2-core box is slow, a quiet one done in ~5 s
    try:
        first = read_until(fd, re.compile(rb"frame (\d+) \xc2\xb7 idle"), deadline, out)
        assert first is not None, screen_text(out)
        early = CELL.findall(bytes(out[: first.end()]))[-64 * 32:]
        os.write(fd, b"ddd")
        moved = read_until(fd, re.compile(rb"frame (\d+) \xc2\xb7 right"), deadline, out)
        assert moved is not None, screen_text(out)
        late = CELL.findall(bytes(out[: moved.end()]))[-64 * 32:]
        assert len(early) == len(late) == 64 * 32  # a full 64×64 frame: 64 columns × 32 rows of cells
        assert early != late  # the frame changed on screen
        os.write(fd, b"q")
        while time.monotonic() < deadline and not done:
            done, status = os.waitpid(pid, os.WNOHANG)
            read_until(fd, NEVER, time.monotonic() + 0.2, out)
        assert done == pid, "play did not exit on q"
        assert os.waitstatus_to_exitcode(status) == 0, screen_text(out)
        assert b"Traceback" not in out
    finally:
        if not done:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)


def test_a_dumb_terminal_is_refused_before_any_work(files):
    # rich's live view draws nothing on TERM=dumb until it stops: 100 frames were played at a blank screen
    pid, fd = spawn(["play", "tiny", "--image", str(files / "start.png"), "--profile", "rx-7800-xt"], TERM="dumb")
    out = bytearray()
    deadline, done = time.monotonic() + 60, 0
    try:
        while time.monotonic() < deadline and not done:
            done, status = os.waitpid(pid, os.WNOHANG)
            read_until(fd, NEVER, time.monotonic() + 0.2, out)
        assert done == pid and os.waitstatus_to_exitcode(status) == 2, screen_text(out)
        assert b"TERM=dumb cannot" in out and b"TERM=xterm-256color" in out
    finally:
        if not done:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
