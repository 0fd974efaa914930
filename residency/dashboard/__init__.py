"""The observation UI: a rich dashboard of telemetry snapshots, the terminal frame view and key input.

Renders immutable snapshots (live, or rebuilt from a trace file); never reaches into the runtime.
"""

from residency.dashboard.context import DashboardContext
from residency.dashboard.dashboard import Dashboard, build, live, require_terminal
from residency.dashboard.frame_view import FrameView
from residency.dashboard.trace_io import read_trace, write_trace

__all__ = ["Dashboard", "DashboardContext", "FrameView", "build", "live", "read_trace", "require_terminal",
           "write_trace"]
