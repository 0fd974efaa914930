"""The screen of `residency play`: the frame in half-blocks, the dashboard beside it, a status line below.

The game loop sets the frame and status; the Live thread renders whatever was set last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style
from rich.text import Text

from residency.dashboard.dashboard import WIDTH_CELLS, Dashboard
from residency.dashboard.frame_view import FrameView
from residency.dashboard.keyboard import HELP

FRAME_MAX_ROWS = 32  # cells; a 64×64 frame is 64 columns × 32 rows
GAP_CELLS = 2  # between the frame and the dashboard
BOARD_MIN_COLS = FRAME_MAX_ROWS * 2 + GAP_CELLS + WIDTH_CELLS  # a narrower terminal shows the frame alone


@dataclass(frozen=True)
class Status:
    """The play loop's status line: frame count, action, step and between-step times (ms), paced vs achieved fps."""
    frame: int  # latent frames generated in this session
    action: str  # what the last frame was asked to do
    step_ms: float  # wall time of the last step (runtime.step, decode included)
    target_fps: float  # video frames per second the loop paces to
    achieved_fps: float  # video frames per second over the recent frames
    behind: bool  # the machine cannot hold target_fps
    between_ms: float = 0.0  # wall time from the step before to this one: drawing, keys, pacing (not the step)
    budget_ms: float = 0.0  # the frame budget per step (0: not known)

    def text(self, board_shown: bool = True) -> Text:
        """The status as one line, with a red warning when target_fps is not held: the machine's steps, or (when a
        step fits its budget) drawing the screen between steps — and, while the dashboard is drawn, that a terminal
        under BOARD_MIN_COLS columns does not draw it."""
        line = Text(f"frame {self.frame} · {self.action:<10} · step {self.step_ms:.1f} ms · "
                    f"between steps {self.between_ms:.1f} ms · {self.achieved_fps:.1f} of {self.target_fps:.0f} fps")
        if self.behind and 0 < self.step_ms <= self.budget_ms:  # "this machine cannot hold" blamed the model
            narrower = (f" (a terminal under {BOARD_MIN_COLS} columns skips the dashboard, and draws faster)"
                        if board_shown else "")
            line.append(f"  behind {self.target_fps:.0f} fps: steps fit their {self.budget_ms:.1f} ms, drawing the "
                        f"screen between them does not{narrower}", style="bold red")
        elif self.behind:
            line.append(f"  this machine cannot hold {self.target_fps:.0f} fps: running as fast as it can",
                        style="bold red")
        return line


class SideBySide:
    """The frame's rows with the dashboard's rendered rows beside them, joined without a rich Table; at most
    `max_rows` rows (the dashboard's last ones give way to a line saying so).

    A Table measures and renders both sides twice per refresh (~40 ms for a 64×64 frame here)."""

    def __init__(self, frame: FrameView, board: Dashboard | None, max_rows: int | None = None):
        self.frame, self.board, self.max_rows = frame, board, max_rows

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        rows = self.frame.rows()
        gap = Segment(" " * GAP_CELLS)
        board = self.board.lines(console, options.update(width=WIDTH_CELLS)) if self.board else []
        if self.max_rows is not None and len(board) > max(self.max_rows, len(rows)):
            board = [*board[:max(self.max_rows, len(rows)) - 1],
                     [Segment(f"… {len(board) - self.max_rows + 1} more dashboard lines in a taller terminal",
                              Style(dim=True))]]
        blank = [Segment(" " * self.frame.cols)]
        for i in range(max(len(rows), len(board))):
            yield from rows[i] if i < len(rows) else blank
            if i < len(board):
                yield gap
                yield from board[i]
            yield Segment.line()


MIN_FRAME_ROWS = 4  # below it the frame is drawn at this height anyway, and the screen says it is cut


def _lines(text_len: int, width: int) -> int:
    """Terminal lines a text of `text_len` cells takes at `width` columns."""
    return max(1, -(-text_len // max(1, width)))


class PlayView:
    """The play screen: the frame, the dashboard beside it when the terminal is wide enough, help, status — fitted
    to the terminal's height at each refresh, so that the help and status lines stay on screen (at 80×24 the
    32-row frame filled the screen and they were cut off, unsaid)."""
    def __init__(self, board: Dashboard, frame: np.ndarray, width_cells: int):
        self.board = board
        self.show_board = width_cells >= BOARD_MIN_COLS
        self._max_cols = min(width_cells, 2 * FRAME_MAX_ROWS)
        self._frame, self._rows = frame, FRAME_MAX_ROWS  # _rows: the frame's height as last fitted to the terminal
        self.frame_view = FrameView(frame, max_cols=self._max_cols, max_rows=self._rows)
        self.status: Status | None = None

    def set_frame(self, frame: np.ndarray) -> None:
        """Show the HxWx3 uint8 `frame`, fitted to the current frame view's size."""
        self._frame = frame
        self.frame_view = FrameView(frame, max_cols=self._max_cols, max_rows=self._rows)

    def _text_lines(self) -> list[Text]:
        lines = [Text(HELP, style="dim")]
        if self.status is not None:
            lines.append(self.status.text(self.show_board))
        if not self.show_board:
            lines.append(Text(f"(widen the terminal to {BOARD_MIN_COLS} columns for the dashboard)", style="dim"))
        return lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width, height = options.max_width, options.height or console.height
        # the terminal's width as it is now: resized narrower, the dashboard was still drawn beside the frame, cut off
        show, cols = width >= BOARD_MIN_COLS, min(width, 2 * FRAME_MAX_ROWS)
        if (show, cols) != (self.show_board, self._max_cols):
            self.show_board, self._max_cols = show, cols
            self.frame_view = FrameView(self._frame, max_cols=cols, max_rows=self._rows)
        text = self._text_lines()
        # the status line grows by a warning: room for its longest form, so the frame does not jump as it comes
        spare = _lines(len(HELP), width) + (_lines(260, width) if self.status is not None else 0) + (
            0 if self.show_board else _lines(70, width))
        rows = min(FRAME_MAX_ROWS, height - spare)
        if rows < MIN_FRAME_ROWS:
            rows = MIN_FRAME_ROWS
            text.append(Text(f"(the terminal is {height} lines: {MIN_FRAME_ROWS + spare} or more show the whole "
                             "screen)", style="dim"))
        if rows != self._rows:
            self._rows = rows
            self.frame_view = FrameView(self._frame, max_cols=self._max_cols, max_rows=rows)
        yield SideBySide(self.frame_view, self.board if self.show_board else None, max_rows=rows)
        yield from text
