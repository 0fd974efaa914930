"""`residency play MODEL`: drive a world model from the keyboard, frames drawn in the terminal.

Paced to the plan's frame budget (the --fps given, 15 by default); says so when the machine cannot hold it.
The closed loop re-plans when frames miss (unless --no-closed-loop, or a plan is given with --plan).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

from residency import session_setup
from residency.commands import run_cmd
from residency.commands.console import make_console
from residency.errors import UsageError

DEFAULT_FPS = 15.0
BOARD_UPDATE_S = 0.25  # the dashboard's snapshot is replaced at most 4×/s: its panels rebuild per snapshot
FPS_WINDOW = 16  # latent frames averaged for the achieved rate
BEHIND_MARGIN = 1.05  # frames this much slower than the budget on average mean "cannot hold it"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `residency play` with the model arguments of `residency run` on `sub`."""
    p = sub.add_parser("play", help="play a world model in the terminal: arrows/WASD, space, e; q quits",
                       description=__doc__.split("\n\n")[0])
    run_cmd.add_model_arguments(p)
    p.add_argument("--no-closed-loop", action="store_true", help="keep the plan made at the start (by default it "
                   "is re-planned when frames miss; never with --plan)")
    p.set_defaults(run=run)


def _require_keyboard() -> None:
    if not sys.stdin.isatty():
        raise UsageError("play reads the keyboard: stdin must be a terminal",
                         hint="run it in a terminal (over SSH use `ssh -t`); for a scripted rollout use "
                         "`residency run --actions …`")


class Pacer:
    """Deadlines one latent frame apart; a late frame moves the deadline instead of building a debt."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self.next_s = time.perf_counter()
        self.recent = collections.deque(maxlen=FPS_WINDOW)  # (seconds between frames)
        self._last = None

    def wait_s(self) -> float:
        """Seconds left until the next frame's deadline (0 when it has passed)."""
        return max(0.0, self.next_s - time.perf_counter())

    def tick(self) -> None:
        """Mark a frame shown now and set the next deadline one period later (never in the past)."""
        now = time.perf_counter()
        if self._last is not None:
            self.recent.append(now - self._last)
        self._last = now
        self.next_s = max(self.next_s + self.period_s, now)

    def achieved_per_s(self) -> float:
        """Frames per second over the recent window (0.0 before the second frame)."""
        return len(self.recent) / sum(self.recent) if self.recent else 0.0

    def behind(self) -> bool:
        """True when, over 4+ recent intervals, frames came slower than the period (with a margin)."""
        return len(self.recent) >= 4 and sum(self.recent) / len(self.recent) > self.period_s * BEHIND_MARGIN


def run(args: argparse.Namespace) -> int:
    """Play the model in the terminal from the keyboard until a quit key; returns 0.

    Raises UsageError when stdout or stdin is not a terminal.
    """
    from rich.console import Console

    from residency.dashboard import Dashboard, live, require_terminal
    from residency.dashboard.keyboard import QUIT_KEYS, RESET_KEYS, action_of, raw_keyboard
    from residency.dashboard.play_view import PlayView, Status

    # Truecolour is forced: SSH does not forward COLORTERM, and rich would fall back to 16 colours.
    console, err = Console(color_system="truecolor"), make_console(stderr=True)
    session_setup.check_model_name(args.model)  # a typo first: off a terminal it was reported as the terminal
    require_terminal(console, "play", "to roll out a fixed action script without a terminal use `residency run "
                     "MODEL --actions … -o frames.gif`")
    run_cmd.check_loop_arguments(args, loop=False)  # --plan with --profile/--fps/--vram: refused, not ignored
    _require_keyboard()
    if args.fps is None and not args.plan:
        args.fps = DEFAULT_FPS
    model = session_setup.load_model(args.model)
    if model.note:
        err.print(f"note: {model.note}")
    image = session_setup.start_image(model, args.image)
    model, plan, replan, other = run_cmd.plan_for(model, args, err)
    per_latent = model.workload.video_frames_per_latent
    period_s = (plan.budget.frame_ms or 1000.0 * per_latent / DEFAULT_FPS) / 1e3
    board = Dashboard(session_setup.context_for(model, plan, other))
    view = PlayView(board, image, console.width)
    vocabulary = model.pipe.config.actions
    runtime = session_setup.attach(model, plan, replan, args.plan)
    # a plan from --plan stays fixed; its decisions show in the dashboard's events
    if not args.no_closed_loop and run_cmd.loop_allowed(other, err) and replan is not None:
        session_setup.enable_loop(runtime, model, None)
    frames = 0
    try:
        session = model.pipe.start(image, seed=args.seed)
        pacer, board_at, step_end = Pacer(period_s), 0.0, None
        with raw_keyboard() as keyboard, live(console, view) as screen:
            while True:
                keys = keyboard.read(pacer.wait_s())
                while pacer.wait_s() > 0 and not any(k in QUIT_KEYS for k in keys):
                    keys += keyboard.read(pacer.wait_s())  # keys gather until the frame's deadline
                if any(k in QUIT_KEYS for k in keys):
                    break
                if any(k in RESET_KEYS for k in keys):
                    session.reset()
                wanted = [a for a in (action_of(k, vocabulary) for k in keys) if a]
                action = wanted[-1] if wanted else "idle"
                t0 = time.perf_counter()
                between_ms = 0.0 if step_end is None else (t0 - step_end) * 1e3  # drawing, keys, pacing
                video = runtime.step(session, action)
                step_end = time.perf_counter()
                step_ms = (step_end - t0) * 1e3
                frames += 1
                pacer.tick()
                view.set_frame(video[-1])
                view.status = Status(frames, action, step_ms, per_latent / period_s,
                                     per_latent * pacer.achieved_per_s(), pacer.behind(), between_ms,
                                     period_s * 1e3)
                if time.perf_counter() - board_at >= BOARD_UPDATE_S:
                    board.update(runtime.telemetry())
                    board_at = time.perf_counter()
                screen.refresh()
    finally:
        snapshot = session_setup.final_snapshot(runtime)
    console.print(f"played {frames} latent frames")
    if frames:
        run_cmd.report_speed(console, snapshot, other)
    return 0
