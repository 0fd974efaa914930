"""`residency demo`: the main job — the shipped world model planned under a VRAM budget that forces
streaming, a scripted rollout with the dashboard, then demo.gif and demo-trace.json.

No GPU: the CPU backend with this machine's cached profile (measured in quick mode the first time). The closed
loop re-plans when frames miss (--no-closed-loop: off); at the end the profile is calibrated on the frames and
cached (`--profile calibrated` uses it), and the last line gives the prediction error before and after.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from residency import session_setup, userpath
from residency.commands import arg_types, run_cmd
from residency.commands.actions import parse_actions
from residency.commands.console import command_name, make_console
from residency.errors import ResidencyError, UsageError
from residency.units import fmt_bytes, plural
from residency.written_together import written_together

DEMO_FPS = 15.0  # video frames per second the plan must hold
VRAM_FRACTION = 0.75  # of the model's weight bytes at the compute dtype: too small to keep every block resident
# 56 latent frames of varied actions: long enough for a steady median, ~5 s of compute on 2 cores.
MAX_FRAMES = 10_000  # latent frames: the whole video is held in memory until demo.gif is written
SCRIPT = "right*8,down*6,jump*2,left*8,up*6,use*2,down_right*6,up_left*6,idle*4,right*8"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `residency demo [-o DIR] [--frames N] [--once] [--profile P] [--no-closed-loop]` on `sub`."""
    p = sub.add_parser("demo", help="plan and run the shipped world model under a small VRAM budget; write a GIF "
                       "and a trace", description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output-dir", default=".", metavar="DIR", help="where demo.gif and demo-trace.json go")
    p.add_argument("--frames", type=arg_types.bounded_int(1, MAX_FRAMES, "latent frames"), metavar="N",
                   help="latent frames (default: the 56 of the script)")
    p.add_argument("--once", action="store_true", help="no live dashboard: print its final render (the default "
                   "when stdout is not a terminal)")
    p.add_argument("--profile", metavar="NAME|PATH", help="device profile, or `calibrated` (this machine's as "
                   "calibrated by an earlier demo or `run --calibrate`; default: this machine's cached profile)")
    p.add_argument("--no-closed-loop", action="store_true", help="keep the plan made at the start (by default it "
                   "is re-planned when frames miss the budget or the prediction)")
    p.set_defaults(run=run)


def _vram_bytes(model: session_setup.Model) -> int:
    """The demo's budget: a fraction of the model's weight bytes at the compute dtype, so some blocks stream."""
    from residency.formats.dtypes import DTYPE_FORMAT

    dtype = session_setup.compute_dtype_for(session_setup.device_kind() != "cpu")
    weights_bytes = model.workload.nbytes(DTYPE_FORMAT[dtype])
    return int(weights_bytes * VRAM_FRACTION)


def _plan_line(plan) -> str:
    placements = Counter(b.placement for b in plan.blocks)
    parts = ", ".join(f"{n} {kind}" for kind, n in placements.most_common())
    p, budget = plan.prediction, plan.budget
    if p.peak_total_bytes > budget.vram_bytes:  # memory first: a fast plan that does not fit holds nothing
        held = f"does not fit: needs {fmt_bytes(p.peak_total_bytes)}"
    elif budget.frame_ms is None:
        held = "no frame budget"
    else:
        held = f"{'holds' if p.frame_ms <= budget.frame_ms else 'misses'} {budget.frame_ms:.1f} ms"
    return (f"plan ({plan.policy}, {plan.profile}): {parts} of {plural(len(plan.blocks), 'block')} within "
            f"{fmt_bytes(budget.vram_bytes)}; predicted {p.frame_ms:.1f} ms per latent frame ({held})")


def run(args: argparse.Namespace) -> int:
    """Plan and run the shipped world model, write demo.gif and demo-trace.json, calibrate and cache the profile;
    returns 0.

    Raises ResidencyError when the output directory cannot be written, UsageError for `--profile calibrated`
    without a calibration.
    """
    console, err = make_console(), make_console(stderr=True)
    out_dir, created = _output_dir(args.output_dir)
    try:
        return _run(args, console, err, out_dir)
    except BaseException:
        _remove_empty(created)  # a failed demo leaves no empty directory behind (a bad --profile did)
        raise


def _demo_output(check: Callable[[Path], Path], path: Path) -> Path:
    """`check(path)` for one of the demo's fixed output names; its refusal hinted at run's options (name a file,
    --trace), which demo has not: the hint says what demo can do."""
    try:
        return check(path)
    except ResidencyError as e:
        if userpath.path_kind(path)[0] == userpath.MISSING:  # the directory's fault (read-only): its own hint
            raise
        e.hint = (f"the demo writes {path.name} into its -o directory: move {path} out of the way, or give "
                  f"another directory (-o DIR)")
        raise


def _run(args: argparse.Namespace, console, err, out_dir: Path) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from residency.dashboard import Dashboard, build, live, write_trace
    from residency.media import check_output_path, write_frames

    gif = _demo_output(check_output_path, out_dir / "demo.gif")
    trace = _demo_output(lambda p: run_cmd.check_trace_path(str(p)), out_dir / "demo-trace.json")
    live_view = console.is_terminal and not args.once
    model = session_setup.load_model("default")
    if model.note:
        err.print(f"note: {model.note}")
    script = SCRIPT.split(",")
    actions = list(itertools.islice(itertools.cycle(parse_actions(",".join(script),
                                                                           model.pipe.config.actions)),
                                    args.frames or 56))
    # This machine's profile, DEMO_FPS and a budget below the model's weight bytes.
    model, plan, replan = session_setup.make_plan(model, err, profile=args.profile, fps=DEMO_FPS,
                                                  vram_bytes=_vram_bytes(model))
    # the demo plans here: no profile file to read. A plan over its budget is refused, or noted where only a GPU
    # profile's own memory misses it (as `run` does)
    other = run_cmd.check_fit(model, plan, run_cmd.plan_device(replan, plan), console, _plan_line(plan),
                              lambda need: "give another --profile, or use `residency run` with --vram "
                              f"{need} or more")
    context = session_setup.context_for(model, plan, other)
    board = Dashboard(context)
    runtime = session_setup.attach(model, plan, replan)
    say = run_cmd.print_line(console)
    if not args.no_closed_loop and run_cmd.loop_allowed(other, err):  # live, the dashboard shows its events
        session_setup.enable_loop(runtime, model, None if live_view else say)
    image = model.start_image
    snapshot = None
    try:
        if live_view:
            with live(console, board):
                video = session_setup.rollout(runtime, model.pipe, image, actions, 0, lambda i, s: board.update(s))
                # the last frame closes at detach: shown before the live view's final render, not after
                snapshot = session_setup.final_snapshot(runtime)
                board.update(snapshot)
        else:
            with Progress(TextColumn("latent frames"), BarColumn(), MofNCompleteColumn(), console=err,
                          transient=True, disable=not err.is_terminal) as progress:
                task = progress.add_task("demo", total=len(actions))
                video = session_setup.rollout(runtime, model.pipe, image, actions, 0, lambda i, s: progress.advance(task))
    finally:
        if snapshot is None:
            snapshot = session_setup.final_snapshot(runtime)
    if not live_view:
        console.print(build(snapshot, context), soft_wrap=False)  # panels wrap their own lines
    with written_together(gif, trace) as (gif_pending, trace_pending):  # all or none (a full disk: neither)
        write_frames(video, gif_pending, DEMO_FPS)
        write_trace(snapshot, context, trace_pending)
    run_cmd.report_speed(console, snapshot, other)
    console.print(f"wrote {gif} ({len(video)} frame{'s' if len(video) != 1 else ''}) and {trace}")
    me = command_name()
    console.print(f"replay the telemetry:  {me} dashboard {shlex.quote(str(trace))}", markup=False, highlight=False)
    console.print(f"play it yourself:      {me} play      (arrows/WASD, space, e; q quits)", markup=False,
                  highlight=False)
    say(_calibration_line(runtime, replan.profile) if other is None else
        f"not calibrated: the plan's profile is {other} (calibration fits this machine's own)")
    return 0


def _output_dir(given: str) -> tuple[Path, list[Path]]:
    """The demo's output directory, created when missing, and the directories created for it (the deepest first).
    Raises ResidencyError when it cannot be."""
    if not given:  # Path("") is ".": the files landed in the working directory unasked
        raise UsageError("-o needs a directory, got an empty name", hint="e.g. -o demo-out, or leave -o out (here)")
    out_dir = Path(given)
    kind, reason = userpath.path_kind(out_dir)
    if kind in (userpath.FILE, userpath.OTHER, userpath.BAD):
        why = reason or "a file, not a directory"
        raise ResidencyError(f"{str(out_dir)[:200]}: cannot write the demo there ({why})",
                             hint="give a directory with -o (it is created if missing)")
    created = []
    if kind == userpath.MISSING:
        missing = out_dir
        while userpath.path_kind(missing)[0] == userpath.MISSING and missing != missing.parent:
            created.append(missing)
            missing = missing.parent
        try:  # a new directory for the demo's two files is what `-o DIR` asks for
            out_dir.mkdir(parents=True)
        except OSError as e:
            _remove_empty(created)
            raise ResidencyError(f"{out_dir}: cannot create the output directory ({e.strerror or e})",
                                 hint="pick a writable place with -o") from None
    return out_dir, created


def _remove_empty(created: list[Path]) -> None:
    """Remove the directories the demo created (the deepest first) while they are empty."""
    for d in created:
        try:
            d.rmdir()
        except OSError:  # not empty (the user put something there meanwhile), or already gone
            return


def _calibration_line(runtime, start_profile) -> str:
    """The demo's last line: the calibration saved and the prediction error before and after it, or why none
    was made (too few frames, a fit too far off, a --profile not this machine's; the demo itself succeeded)."""
    from residency.device.calibrated import not_the_machines

    why = not_the_machines(start_profile)
    if why is not None:
        return f"not calibrated: the plan's profile is not what a calibration is cached for ({why})"
    try:
        return session_setup.calibrate_session(runtime, start_profile).line()
    except ResidencyError as e:
        return f"not calibrated: {e.message}"
