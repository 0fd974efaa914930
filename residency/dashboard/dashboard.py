"""The dashboard: a rich renderable of the latest telemetry snapshot, live (rich Live) or rendered once.

The rollout hands it immutable snapshots; the Live thread renders whichever is newest, never the runtime.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.rule import Rule
from rich.segment import Segment

from residency.dashboard import panels
from residency.dashboard.context import DashboardContext
from residency.errors import UsageError
from residency.telemetry import TelemetrySnapshot

REFRESH_PER_S = 4  # the floor asked for; a refresh with a new snapshot renders ~40 rows (~5 ms here)
WIDTH_CELLS = 72  # panel width: bars and sparklines are sized to fit it


class Dashboard:
    """Holds the newest snapshot; renders it to lines once per snapshot and width, then reuses the lines."""

    def __init__(self, context: DashboardContext, snapshot: TelemetrySnapshot | None = None):
        self.context = context
        self._snapshot = snapshot
        self._built: tuple[TelemetrySnapshot | None, RenderableType] | None = None
        self._lines: tuple[object, int, list[list[Segment]]] | None = None

    def update(self, snapshot: TelemetrySnapshot) -> None:
        # One reference assignment: the Live thread sees the old snapshot or the new one, never a mix.
        """Show `snapshot` from the next refresh on; safe to call from another thread than the renderer's."""
        self._snapshot = snapshot

    @property
    def snapshot(self) -> TelemetrySnapshot | None:
        """The newest snapshot given, or None before the first."""
        return self._snapshot

    def renderable(self) -> RenderableType:
        """The dashboard for the newest snapshot, built once per snapshot and reused."""
        snap = self._snapshot
        if self._built is not None and self._built[0] is snap:
            return self._built[1]
        built = build(snap, self.context)
        self._built = (snap, built)
        return built

    def lines(self, console: Console, options: ConsoleOptions) -> list[list[Segment]]:
        """The rendered rows; a refresh without a new snapshot costs nothing but writing them out."""
        snap, width = self._snapshot, options.max_width
        if self._lines is None or self._lines[0] is not snap or self._lines[1] != width:
            rows = console.render_lines(self.renderable(), options.update(height=None), pad=False)
            self._lines = (snap, width, rows)
        return self._lines[2]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for row in self.lines(console, options):
            yield from row
            yield Segment.line()


def build(snapshot: TelemetrySnapshot | None, context: DashboardContext) -> RenderableType:
    """The dashboard panel for `snapshot` (WIDTH_CELLS wide): frame times, blocks, VRAM, link, prediction and
    the closed loop (ratios per engine, re-plans, decisions).

    With no snapshot, or none with a frame yet, a panel saying it waits for the first frame.
    """
    if snapshot is None or not snapshot.frames:
        return Panel(f"{context.title}\nwaiting for the first frame…", width=WIDTH_CELLS)
    bar_cells = WIDTH_CELLS - 6
    body = Group(
        panels.frame_times(snapshot, context, bar_cells),
        Rule(style="dim"),
        panels.block_bars(snapshot, width_cells=max(10, WIDTH_CELLS - 46)),
        Rule(style="dim"),
        panels.vram_map(snapshot, context, bar_cells),
        Rule(style="dim"),
        panels.link(snapshot, bar_cells),
        Rule(style="dim"),
        panels.predicted_vs_measured(snapshot, context.predicted_for),
        Rule(style="dim"),
        panels.closed_loop(snapshot, bar_cells, context.predicted_for),
    )
    # A title longer than the panel would widen it (rich sizes panels to their titles): cut it to fit.
    title = panels.header(snapshot, context)
    title.truncate(WIDTH_CELLS - 6, overflow="ellipsis")
    return Panel(body, title=title, title_align="left", width=WIDTH_CELLS)


def require_terminal(console: Console, what: str, instead: str) -> None:
    """The live view needs a terminal on stdout; elsewhere refuse before any work (exit 2), the hint saying what
    `instead` works without one for this command."""
    if not console.is_terminal or not sys.stdout.isatty():
        raise UsageError(f"{what} needs a terminal on stdout (it is a pipe or a file)",
                         hint=f"{instead}, or run it in a terminal")
    if console.is_dumb_terminal:  # rich's live view draws nothing there until it stops: a blank screen while playing
        raise UsageError(f"{what} redraws the screen in place, which TERM={os.environ.get('TERM', '')} cannot",
                         hint=f"set TERM to your terminal's (e.g. TERM=xterm-256color), or {instead}")


@contextlib.contextmanager
def live(console: Console, renderable: RenderableType | Dashboard) -> Iterator[Live]:
    """A rich Live refreshing `renderable` REFRESH_PER_S times a second from its own thread."""
    with Live(renderable, console=console, refresh_per_second=REFRESH_PER_S, transient=False,
              redirect_stdout=False, redirect_stderr=False) as view:
        yield view
