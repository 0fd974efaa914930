"""A video frame drawn in the terminal: two pixels per cell with the upper-half block and truecolour.

Works over SSH in any terminal with 24-bit colour; the frame is downscaled to the cells given.
"""

from __future__ import annotations

import numpy as np
from rich.color import Color
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style

UPPER_HALF = "▀"


def fit(frame: np.ndarray, max_cols: int, max_rows: int) -> np.ndarray:
    """Nearest-neighbour downscale (never up) to at most max_cols × 2·max_rows pixels, even height."""
    h, w = frame.shape[:2]
    scale = min(1.0, max_cols / w, 2 * max_rows / h)
    rows = max(2, int(h * scale) // 2 * 2)
    cols = max(1, int(w * scale))
    ys = (np.arange(rows) * h / rows).astype(int)
    xs = (np.arange(cols) * w / cols).astype(int)
    return frame[ys][:, xs]


STYLE_CACHE_MAX = 1 << 16  # (top, bottom) colour pairs kept; a game scene reuses few, noise reuses none
_styles: dict[tuple[int, ...], Style] = {}


def _style(r1: int, g1: int, b1: int, r2: int, g2: int, b2: int) -> Style:
    """A cached Style per colour pair: a Style renders its ANSI codes once and keeps them."""
    key = (r1, g1, b1, r2, g2, b2)
    style = _styles.get(key)
    if style is None:
        if len(_styles) >= STYLE_CACHE_MAX:
            _styles.clear()
        # Style.from_color skips Style.__init__'s validation: a third of the cost on a new colour pair.
        style = _styles[key] = Style.from_color(Color.from_rgb(r1, g1, b1), Color.from_rgb(r2, g2, b2))
    return style


def rows_of(px: np.ndarray) -> list[list[Segment]]:
    """One row of styled cells per pixel-row pair, built once per frame."""
    pairs = np.concatenate([px[0::2][: px.shape[0] // 2], px[1::2]], axis=-1).tolist()  # (rows, cols, 6)
    return [[Segment(UPPER_HALF, _style(*cell)) for cell in row] for row in pairs]


class FrameView:
    """A rich renderable of one HxWx3 uint8 frame; renders the same cells every refresh at no extra cost."""

    def __init__(self, frame: np.ndarray, max_cols: int = 96, max_rows: int = 32):
        self.pixels = fit(np.asarray(frame, dtype=np.uint8), max_cols, max_rows)
        self._rows: list[list[Segment]] | None = None

    @property
    def cols(self) -> int:
        """Width of the fitted frame in terminal cells (one pixel per cell)."""
        return self.pixels.shape[1]

    def rows(self) -> list[list[Segment]]:
        """The styled cells, one list per terminal row (two pixel rows); built on first use, then cached."""
        if self._rows is None:
            self._rows = rows_of(self.pixels)
        return self._rows

    def __rich_console__(self, console, options):
        for row in self.rows():
            yield from row
            yield Segment.line()

    def __rich_measure__(self, console, options):
        return Measurement(self.cols, self.cols)
