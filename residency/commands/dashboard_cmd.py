"""`residency dashboard TRACE`: replay a trace written by `run --trace` or `demo` in the live dashboard.

`--once` prints the final render as text (works in pipes); the live view needs a terminal (else exit 2).
"""

from __future__ import annotations

import time

from residency.commands import arg_types
from residency.commands.console import make_console

MAX_REPLAY_FRAME_S = 0.5  # a slow recorded frame is shown for at most this long, so replays stay short


def add_parser(sub) -> None:
    """Register `residency dashboard TRACE [--once] [--speed X]` on the subparsers `sub`."""
    p = sub.add_parser("dashboard", help="replay a rollout's trace in the dashboard (or --once: print it)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("trace", metavar="TRACE", help="a trace JSON from `residency run --trace` or `residency demo`")
    p.add_argument("--once", action="store_true", help="print one render of the whole trace as text and exit")
    p.add_argument("--speed", type=arg_types.SPEED, default=1.0, metavar="X",
                   help="replay speed (default 1: as recorded)")
    p.set_defaults(run=run)


def replay(board, snapshot, speed: float) -> None:
    """Feed the dashboard growing prefixes of the recorded frames, each with the closed loop's events decided by
    then, at the recorded pace: a frame's period (its work and the caller's gap after it) divided by `speed`."""
    from residency.dashboard.trace_io import replay_prefix

    for n in range(1, len(snapshot.frames) + 1):
        board.update(replay_prefix(snapshot, n))
        time.sleep(min(MAX_REPLAY_FRAME_S, snapshot.frames[n - 1].period_ms / 1e3 / speed))


def run(args) -> int:
    """Replay a trace file live, or print one render with --once; returns the exit status 0.

    Raises UsageError for a non-positive --speed or (live) when stdout is not a terminal, and
    ResidencyError for an unreadable trace.
    """
    from residency.dashboard import Dashboard, build, live, read_trace, require_terminal
    from residency.errors import UsageError

    console = make_console()
    if not args.once:
        require_terminal(console, "the live dashboard", "add --once to print one render as text")
    if not args.speed > 0:
        raise UsageError(f"--speed must be positive, got {args.speed}", hint="e.g. --speed 2")
    snapshot, context = read_trace(args.trace)
    if args.once:
        console.print(build(snapshot, context), soft_wrap=False)  # panels wrap their own lines
        return 0
    board = Dashboard(context)
    with live(console, board):
        replay(board, snapshot, args.speed)
    return 0
