"""`residency run MODEL`: a headless rollout under a plan — frames to a GIF/PNGs, telemetry to a trace.

Also the arguments and the output `play` and `demo` share; their session set-up is `residency.session_setup`.
The dashboard (torch), the media writers (PIL) and rich's progress bar are imported inside `run`: the CLI
imports every command at start, and only the command that runs needs them.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from residency.commands import arg_types
from residency.commands.actions import parse_actions
from residency.commands.console import make_console
from residency.commands.loaded_plan import predicted_here
from residency.errors import BudgetError, ResidencyError, UsageError
from residency.formats.dtypes import KV_DTYPE_BYTES
from residency.session_setup import (
    Console,
    Model,
    attach,
    calibrate_session,
    context_for,
    enable_loop,
    final_snapshot,
    load_model,
    make_plan,
    rollout,
    start_image,
)
from residency.units import plural
from residency.written_together import written_together

if TYPE_CHECKING:  # they import torch
    from policies import Replanner
    from residency.device import DeviceProfile
    from residency.plan import Plan
    from residency.telemetry import TelemetrySnapshot

DEFAULT_ACTIONS = "right*4,down*4,left*4,up*4"
GIF_FPS = 15.0  # playback rate of written GIFs when no --fps is given
MAX_FRAMES = 100_000  # latent frames of one run: every video frame is held until the file is written


def add_model_arguments(p: argparse.ArgumentParser, plan_option: bool = True) -> None:
    """MODEL, image and planning options, shared by run, play and demo."""
    p.add_argument("model", metavar="MODEL", nargs="?", default="default",
                   help="default (the shipped trained model, or tiny), tiny, or a saved pipeline directory/file")
    p.add_argument("--image", metavar="PNG", help="start image at the model's size (default model: its first "
                   "held-out start image)")
    if plan_option:
        p.add_argument("--plan", metavar="PATH", help="a plan from `residency plan -o` (instead of planning here)")
    p.add_argument("--profile", metavar="NAME|PATH", help="device profile, or `calibrated` (this machine's as "
                   "calibrated by `run --calibrate`; default: this machine's, measured once in quick mode and cached)")
    p.add_argument("--fps", type=arg_types.FPS, metavar="N", help="video frames per second to plan for")
    p.add_argument("--vram", type=arg_types.vram_size, metavar="SIZE", help="device memory the plan may use, "
                   "e.g. 20MiB, or a share of the model's weights such as 50%% (default: the profile's usable "
                   "memory; on the CPU no more than the RAM available now less the host store)")
    p.add_argument("--kv-dtype", choices=tuple(KV_DTYPE_BYTES), default=None,
                   help="what the KV cache is stored in (default: the planner's choice: the model's own dtype, or "
                   "fp8 where that plans better or nothing else fits)")
    p.add_argument("--seed", type=arg_types.seed, default=0, help="noise seed of the session (0 to 2**64-1)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `residency run MODEL -o PATH [--actions] [--frames] [--trace] [--dashboard] [--calibrate]
    [--closed-loop]` on `sub`."""
    p = sub.add_parser("run", help="a headless rollout under a plan: frames to GIF/PNG, telemetry to a trace",
                       description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--actions", default=DEFAULT_ACTIONS, metavar="SCRIPT",
                   help=f"one action per latent frame, e.g. 'right*8,up*4,idle*2' (default {DEFAULT_ACTIONS})")
    p.add_argument("--frames", type=arg_types.bounded_int(1, MAX_FRAMES, "latent frames"), metavar="N",
                   help="latent frames to generate (the script repeats)")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="out.gif, or out.png for numbered PNGs")
    p.add_argument("--trace", metavar="PATH", help="write the Chrome trace (Perfetto) of the rollout here")
    p.add_argument("--dashboard", action="store_true", help="show the live dashboard on stdout (needs a terminal)")
    p.add_argument("--calibrate", action="store_true", help="after the rollout, fit this machine's profile to its "
                   "frames and cache it for `--profile calibrated`")
    p.add_argument("--closed-loop", action="store_true", help="re-plan when frames miss the budget or the "
                   "prediction (each decision printed as a line)")
    p.set_defaults(run=run)


def check_loop_arguments(args: argparse.Namespace, loop: bool, calibrate: bool = False) -> None:
    """Refuse what a fixed plan cannot do: re-plan (`loop`) or be calibrated (`calibrate`) under --plan.

    Raises UsageError."""
    if not getattr(args, "plan", None):
        return
    fixed = [flag for flag, value in (("--profile", args.profile), ("--fps", args.fps), ("--vram", args.vram))
             if value is not None]
    if fixed:
        raise UsageError(f"{', '.join(fixed)} would be ignored: a plan from --plan fixes its profile and budgets",
                         hint="drop them, or drop --plan to plan here for them")
    if loop:
        raise UsageError("--closed-loop re-plans, and a plan from --plan stays fixed",
                         hint="drop --plan to plan here, or drop --closed-loop")
    if calibrate:
        raise UsageError("--calibrate fits the profile the plan is made with here, not a plan from --plan",
                         hint="drop --plan (give --profile to plan for a profile)")


def check_calibration(other: str | None, frames: int) -> None:
    """Refuse, before the rollout, a --calibrate that could only fail or mislead: too few frames to fit past the
    warm-up, or a plan's profile of another kind than this runtime (`other`, see other_device: a GPU profile
    fitted to CPU timings describes neither). Raises UsageError."""
    from residency.device.calibrated import MIN_SAVED_FIT_FRAMES
    from residency.telemetry.calibration import WARMUP_FRAMES

    least = WARMUP_FRAMES + MIN_SAVED_FIT_FRAMES
    if frames < least:
        raise UsageError(f"--calibrate needs at least {least} latent frames (the first {WARMUP_FRAMES} are a "
                         f"warm-up, then {MIN_SAVED_FIT_FRAMES} to fit); this run has {frames}",
                         hint=f"give --frames {least} or more")
    if other is not None:
        raise UsageError(f"--calibrate fits a profile to this machine's timings; the plan's profile is {other}",
                         hint="drop --profile to calibrate this machine's profile, or drop --calibrate")


def check_calibration_base(args: argparse.Namespace) -> None:
    """Refuse, before the rollout, a --calibrate of a profile that is not this machine's cached one (a file measured
    at another time, or edited; calibrated.not_the_machines), and an unwritable calibration cache (found after the
    rollout, the fit was lost). Raises UsageError / ResidencyError."""
    from residency.device import CALIBRATED, resolve_profile
    from residency.device.calibrated import check_cache_writable, not_the_machines

    if args.profile is not None and args.profile != CALIBRATED and not getattr(args, "plan", None):
        why = not_the_machines(resolve_profile(args.profile))
        if why is not None:
            raise UsageError(f"--calibrate caches a calibration of this machine's profile, the one `run` plans with "
                             f"by default and `--profile calibrated` builds on; {args.profile}: {why}",
                             hint="drop --profile to calibrate this machine's profile (measured the first time), or "
                                  "drop --calibrate")
    check_cache_writable()


def _named_profile_other(args: argparse.Namespace) -> str | None:
    """other_device's words for the profile --profile names (a shipped name or a file), read before planning; None
    when none is named, it is `calibrated` (this machine's), or it is of this runtime's kind."""
    from residency.device import CALIBRATED, resolve_profile

    if args.profile is None or args.profile == CALIBRATED or getattr(args, "plan", None):
        return None
    return _other_kind(resolve_profile(args.profile))


def _check_closed_loop(args: argparse.Namespace, other: str | None) -> None:
    if args.closed_loop and other is not None:
        raise UsageError(f"--closed-loop fits the plan's profile to this machine's timings; it is {other}",
                         hint="drop --profile to plan for this machine, or drop --closed-loop")


def loop_allowed(other: str | None, console: Console) -> bool:
    """Whether `play`'s and `demo`'s closed loop may run: not when the plan's profile is of another kind than this
    runtime (`other`, see other_device), which is said on `console`."""
    if other is not None:
        console.print(f"note: the closed loop is off: it would fit the plan's profile ({other}) to this machine's "
                      "timings", markup=False, highlight=False)
    return other is None


def print_line(console: Console) -> Callable[[str], None]:
    """A say(line) that prints `line` as it is (no rich markup: "[kind]" and paths stay literal)."""
    return lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)


def plan_for(model: Model, args: argparse.Namespace,
             console: Console) -> tuple[Model, Plan, Replanner | None, str | None]:
    """The model to run (at a loaded plan's steps: session_setup.make_plan) and the plan the model options of
    `add_model_arguments` ask for, stated on `console` in one line (and where a loaded plan's predictions come
    from), its replanner, and the other device its predictions are for (other_device; None: they compare with
    this run's).

    Raises BudgetError (exit 3), before anything is loaded on the device, when no plan fits the VRAM budget."""
    from residency.commands.plan_render import verdict

    model, plan, replan = make_plan(model, console, plan_path=getattr(args, "plan", None), profile=args.profile,
                                    fps=args.fps, vram_bytes=args.vram, image_path=getattr(args, "image", None),
                                    kv_dtype=args.kv_dtype)
    device = plan_device(replan, plan)  # a loaded plan's: its profile file read once, here
    given = getattr(args, "plan", None)
    if given and device is not None:
        plan = predicted_here(model, plan, device, given, console)
    other = check_fit(model, plan, device, console, f"plan ({plan.policy}, {plan.profile}): {verdict(plan)}",
                      lambda need: f"make the plan again with `residency plan … --vram {need}` or more" if given
                      else f"raise --vram to at least {need}, or leave it out", given)
    if given:
        compiled = " Its compiled blocks compile first (once, cached on disk)." if any(
            bp.exec_mode == "compiled" for bp in plan.blocks) else ""
        compare = ("its predictions are that device's, which this run does not compare its measurements with"
                   if other else "this run compares its measurements with the plan's predictions"
                   if plan.prediction is not None else
                   "it holds no prediction, so this run measures without comparing (an edited plan is predicted "
                   "again here when it was made for a shipped profile or this machine's cached one: `residency plan "
                   "… -o` without --profile makes one)")
        console.print(f"note: {given} was made for {plan.profile}: {compare}.{compiled}", markup=False,
                      highlight=False)
    return model, plan, replan, other


def check_fit(model: Model, plan: Plan, device: DeviceProfile | None, console: Console, line: str,
              hint: Callable[[str], str], given: str | None = None) -> str | None:
    """Refuse a plan that does not fit its VRAM budget, else print `line` (the plan stated) and, for a GPU plan run on
    this CPU that misses its budget only by the GPU's own memory, a note that it runs all the same; returns the other
    device its predictions are for (other_device). `hint(need)`: what to do, given the bytes needed; `given`: the
    plan file's name, if one was given.

    Refused only when the plan is for a profile of this runtime's kind: a GPU profile's prediction counts a GPU's
    workspace the CPU runtime never holds (a GPU plan tried on the CPU runs, as the README shows) — unless it does
    not fit even as the CPU runtime holds it."""
    from residency import session_setup
    from residency.units import fmt_bytes, size_at_least

    graphed = sum(bp.exec_mode == "graphed" for bp in plan.blocks)
    if graphed and session_setup.device_kind() == "cpu":  # refused by the runtime too, but after the plan was said
        raise ResidencyError(f"{given or 'the plan'} runs {plural(graphed, 'block')} graphed (captured as CUDA/HIP "
                             "graphs): this CPU backend captures none",
                             hint="make the plan with `residency plan … --exec-mode eager -o plan.json` (or compiled), "
                                  "or run it where torch sees a GPU")
    pred = plan.prediction
    other = _other_kind(device, plan)
    same_kind = device is not None and other is None
    if same_kind and pred is not None and pred.peak_total_bytes > plan.budget.vram_bytes:
        if given:  # a plan file, perhaps edited: nothing was searched, so "the smallest found" would be untrue
            raise BudgetError(f"{given} does not fit its own {fmt_bytes(plan.budget.vram_bytes)} VRAM budget: it "
                                 f"needs {fmt_bytes(pred.peak_total_bytes)}",
                                 hint=hint(size_at_least(pred.peak_total_bytes)))
        raise BudgetError(f"no plan fits the {fmt_bytes(plan.budget.vram_bytes)} VRAM budget: the smallest "
                             f"{plan.policy} found needs {fmt_bytes(pred.peak_total_bytes)}",
                             hint=hint(size_at_least(pred.peak_total_bytes)))
    console.print(line)  # `line` may carry rich markup (plan_render.verdict)
    gpu_plan_on_cpu = other is not None and session_setup.device_kind() == "cpu"  # (a CPU plan on a GPU is held)
    if gpu_plan_on_cpu and pred is not None and pred.peak_total_bytes > plan.budget.vram_bytes:
        held = _held_on_cpu(model, plan, device)
        if held > plan.budget.vram_bytes:  # "it runs all the same" was said, and the ledger refused it next line
            raise BudgetError(f"{given or 'the plan'} does not fit its {fmt_bytes(plan.budget.vram_bytes)} VRAM "
                                 f"budget even as this CPU runtime holds it (without {plan.profile}'s workspace and "
                                 f"device staging): it needs {fmt_bytes(held)}", hint=hint(size_at_least(held)))
        console.print(f"note: it runs all the same: the miss is {plan.profile}'s workspace, which this CPU runtime "
                      "does not hold; its ledger enforces the budget", markup=False, highlight=False)
    return other


def _held_on_cpu(model: Model, plan: Plan, device: DeviceProfile | None) -> int:
    """Device bytes this CPU runtime holds for a GPU plan: its memory predicted as for a CPU (no GPU workspace, no
    device staging of packed blobs, the CPU's dequant chunks); without the plan's profile, its own prediction less
    the workspace and the dequant scratch (less than the runtime holds: never refused where it would run)."""
    import dataclasses

    from residency.simulate.memory import peak_bytes

    if device is not None:
        kinds = peak_bytes(model.workload, plan, dataclasses.replace(device, backend="cpu"))
        return sum(v for k, v in kinds.items() if k != "reserve")
    kinds = plan.prediction.peak_bytes
    return plan.prediction.peak_total_bytes - kinds.get("workspace", 0) - kinds.get("dequant_scratch", 0)


def plan_profile(plan: Plan) -> DeviceProfile | None:
    """The profile a loaded plan was made for, found by its fingerprint among the shipped profiles and this
    machine's cached one; None when it is none of them (a profile file elsewhere, a calibrated one)."""
    from residency import session_setup
    from residency.device import cached_profile_path, load_profile
    from residency.device.profile_io import shipped_profile_names

    candidates: list[str | Path] = [*shipped_profile_names(), cached_profile_path(session_setup.device_kind())]
    for name in candidates:
        try:
            profile = load_profile(name)
        except ResidencyError:  # a missing or unreadable cache: not this plan's profile
            continue
        if profile.fingerprint() == plan.profile_fingerprint:
            return profile
    return None


def plan_device(replan: Replanner | None, plan: Plan | None = None) -> DeviceProfile | None:
    """The profile a plan predicts for: the one it was made with here, else a loaded plan's (plan_profile)."""
    if replan is not None:
        return replan.request.profile
    return plan_profile(plan) if plan is not None else None


def other_device(replan: Replanner | None, plan: Plan | None = None) -> str | None:
    """The device a plan predicts when its profile is not of this runtime's kind ("GeForce RTX 5090, a GPU
    profile, not this CPU"), else None: same kind, or a loaded `plan` whose profile is not known here
    (plan_profile; the note beside it says whose predictions they are)."""
    return _other_kind(plan_device(replan, plan), plan)


def _other_kind(profile: DeviceProfile | None, plan: Plan | None = None) -> str | None:
    """See other_device; a profile not known here is told by the backend the plan records (a GPU plan made from
    someone's profile file was compared with this CPU's measurements: +317%)."""
    from residency import session_setup

    if profile is not None:
        name, gpu = profile.name, profile.is_gpu
    elif plan is not None and plan.profile_backend:
        name, gpu = plan.profile, plan.profile_backend != "cpu"
    else:
        return None
    here_gpu = session_setup.device_kind() != "cpu"
    if gpu == here_gpu:
        return None
    return f"{name}, a {'GPU' if gpu else 'CPU'} profile, not this {'GPU' if here_gpu else 'CPU'}"


# --- output ------------------------------------------------------------------------------------------------
def check_trace_path(path: str) -> Path:
    """Validated before any work, like the frames' path: a .json in an existing, writable directory."""
    from residency import userpath
    from residency.media import check_writable_target

    p = Path(path)
    if userpath.path_kind(p)[0] == userpath.DIRECTORY:  # an unwritable output, exit 1 as -o's is
        raise ResidencyError(f"{str(p)[:200]}: a directory, not a trace file",
                             hint="give a file name, e.g. --trace trace.json (open it in Perfetto)")
    if p.suffix.lower() != ".json":
        raise UsageError(f"{p}: a trace is a .json file", hint="e.g. --trace trace.json (open it in Perfetto)")
    return check_writable_target(p)


OFF_BY = 0.20  # a prediction further off than this gets the hint to calibrate (the "within 20%")
STEADY_SKIP = 2  # latent frames left out of the steady figure: the first ones compile, fill caches, touch pages
MIN_HINT_FRAMES = 4  # steady frames before a prediction off by OFF_BY is worth a hint to calibrate
FEW_FRAMES_OFF_BY = 0.5  # from fewer, the error that is (this VM's frames drift ±25 %)


def _against_predictions(snapshot: TelemetrySnapshot, line: str, measured: float,
                         predicted: float) -> tuple[str, float, float]:
    """`line` with the measured steady frame against the plan's prediction — and, where the closed loop re-predicted,
    its last prediction against the frames measured since (the steady median of every frame against a prediction
    fitted to a late window read -22 % and +51 % in two demos whose calibration was within 3 %). Returns the line
    and the (measured, predicted) pair the hint to calibrate is judged by: the latest."""
    repredicted = [e for e in snapshot.events if e.new_predicted_ms is not None]
    if not repredicted:  # the running plan's (a re-plan after an out-of-memory logs no event: its plan's, as before)
        return line + f"; the plan predicted {predicted:.1f} ms ({(measured - predicted) / predicted:+.0%})", \
            measured, predicted
    # the loop's starting prediction: the earliest kept frame's (a run past the recorder's window: a later one)
    first = next((f.predicted_frame_ms for f in snapshot.frames if f.frame > 0 and f.predicted_frame_ms), None)
    start = first or predicted
    line += f"; the plan predicted {start:.1f} ms ({(measured - start) / start:+.0%})"
    last = repredicted[-1]
    since = [f.frame_ms for f in snapshot.frames if f.frame > STEADY_SKIP and f.start_s >= last.time_s]
    new = last.new_predicted_ms
    if len(since) < 3:  # too few frames to judge it by
        return line + f"; the closed loop last re-predicted {new:.1f} ms, {plural(len(since), 'frame')} before the end", \
            measured, start
    now = statistics.median(since)
    return (line + f"; the closed loop last re-predicted {new:.1f} ms, and the {len(since)} frames since measured "
            f"{now:.1f} ms ({(now - new) / new:+.0%})"), now, new


def report_speed(console: Console, snapshot: TelemetrySnapshot, other: str | None = None,
                 calibrate_hint: str | None = None) -> None:
    """The steady measured work ms per latent frame beside the plan's prediction, then the caller's gap. With
    `other` (see other_device) the prediction is for another device: shown, but no error is computed. With
    `calibrate_hint`, a prediction off by more than OFF_BY is followed by that hint (how to calibrate)."""
    from residency.telemetry.recorder import known_gaps

    measured, gap = snapshot.steady_frame_ms(STEADY_SKIP), snapshot.steady_gap_ms(STEADY_SKIP)
    warm_up = measured != measured  # nan: too few frames for a steady median
    if warm_up:
        frames = [f for f in snapshot.frames if f.frame > 0]
        measured = frames[-1].frame_ms if frames else float("nan")
        gaps = known_gaps(frames)
        gap = gaps[-1] if gaps else float("nan")
    predicted = snapshot.prediction.frame_ms if snapshot.prediction else None
    steady = sum(1 for f in snapshot.frames if f.frame > STEADY_SKIP)
    if warm_up:  # its one-time costs (compiles, first touches) are no steady frame: nothing to compare
        line = (f"measured {measured:.1f} ms for the last latent frame, a warm-up frame (the first {STEADY_SKIP} pay "
                f"one-time costs: compiles, caches); --frames {STEADY_SKIP + 2} or more for a steady figure")
        if predicted:
            line += f"; the plan predicts {predicted:.1f} ms for a steady frame" + (f" on {other}" if other else "")
    else:  # one steady frame is one sample: a loaded moment read as "+135%" with a hint to calibrate
        line = (f"measured {measured:.1f} ms per latent frame" if steady > 1 else
                f"measured {measured:.1f} ms for the one steady latent frame (a single sample; --frames "
                f"{STEADY_SKIP + 5} or more for a median)")
        if predicted and other:  # a GPU's 8 ms against a CPU's 40 read as "+400%": an error, which it is not
            line += f"; the plan's {predicted:.1f} ms is predicted for {other}, so the two do not compare"
        elif predicted:
            line, measured, predicted = _against_predictions(snapshot, line, measured, predicted)
    if gap > 0:  # nan compares false
        line += (f"; {gap:.1f} ms more passed between frames outside the model (the program around it: drawing, "
                 "saving; not in the measured frame)")
    console.print(line)
    # a median of 2 steady frames is noise on a loaded machine (the hint fired on 5 of 11 identical 4-frame runs):
    # from so few, only an error no noise makes is worth the hint
    off = abs(measured - predicted) / predicted if predicted else 0.0
    if (predicted and not other and not warm_up and calibrate_hint and steady > 1
            and off > (OFF_BY if steady >= MIN_HINT_FRAMES else FEW_FRAMES_OFF_BY)):
        console.print(f"hint: the prediction is off by more than {OFF_BY:.0%}: {calibrate_hint}", markup=False,
                      highlight=False)


def _calibrate_hint(args: argparse.Namespace, frames: int) -> str | None:
    """What to do about a prediction far off: calibrate (with enough frames), or fit the calibration again; for a
    given plan (which a run does not calibrate), calibrate without it and make the plan again from the calibration.
    None when the run calibrates already."""
    from residency.device.calibrated import FULL_FIT_FRAMES, MIN_SAVED_FIT_FRAMES
    from residency.telemetry.calibration import WARMUP_FRAMES

    if args.calibrate:
        return None
    more = f" --frames {max(8, WARMUP_FRAMES + MIN_SAVED_FIT_FRAMES)}" if frames < WARMUP_FRAMES + MIN_SAVED_FIT_FRAMES \
        else ""
    if getattr(args, "plan", None):
        return (f"run it once without --plan and with{more} --calibrate (this machine's profile fitted, cached), then "
                f"make the plan again with `residency plan {args.model} --profile calibrated … -o {args.plan}`")
    if args.profile == "calibrated":
        full = WARMUP_FRAMES + FULL_FIT_FRAMES  # fewer fitted frames do not replace the cached fit: it stayed
        again = f" --frames {full}" if frames < full else ""
        return ("the calibration is off too (fitted on another plan — one that moved no weights fits no copy engine "
                f"— or the machine changed since): run again with{again} --calibrate to fit it anew on this plan")
    if args.profile is not None:  # --calibrate fits this machine's cached profile only (check_calibration_base)
        return (f"run it without --profile and with{more} --calibrate to fit this machine's profile to a run (cached), "
                "then plan with --profile calibrated")
    return f"add{more} --calibrate to fit this machine's profile to a run (cached), then plan with --profile calibrated"


# --- run ---------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Roll the model out headless under its plan; write the frames and, with --trace, the trace.

    With --closed-loop the loop re-plans as frames miss; with --calibrate the profile is fitted to the frames
    and cached, and the prediction error before and after is printed last.

    Returns 0. Raises UsageError for a bad action script, --dashboard without a terminal, or --closed-loop /
    --calibrate with --plan, and ResidencyError for an unwritable output path or a failed calibration.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from residency.dashboard import Dashboard, live, require_terminal, write_trace
    from residency.media import check_output_path, gif_frame_ms, write_frames

    console, err = make_console(), make_console(stderr=True)
    check_loop_arguments(args, args.closed_loop, args.calibrate)
    if args.dashboard:
        require_terminal(console, "--dashboard", "drop --dashboard (the frames and any --trace are written all the "
                         "same; `residency dashboard TRACE --once` prints the trace's render as text)")
    out = check_output_path(args.output)
    trace = check_trace_path(args.trace) if args.trace else None
    model = load_model(args.model)
    if model.note:
        err.print(f"note: {model.note}")
    script = parse_actions(args.actions, model.pipe.config.actions)
    actions = list(itertools.islice(itertools.cycle(script), args.frames or len(script)))
    image = start_image(model, args.image)
    if args.calibrate or args.closed_loop:  # before planning (a plan takes seconds): what is known now
        named = _named_profile_other(args)
        if args.calibrate:
            check_calibration(named, len(actions))
            check_calibration_base(args)
        _check_closed_loop(args, named)
    model, plan, replan, other = plan_for(model, args, err)
    if args.calibrate:
        check_calibration(other, len(actions))
    _check_closed_loop(args, other)
    context = context_for(model, plan, other)
    runtime = attach(model, plan, replan, getattr(args, "plan", None))
    if args.closed_loop:  # the live dashboard shows the loop's events; else each is printed as it happens
        enable_loop(runtime, model, None if args.dashboard else print_line(console))
    snapshot = None
    try:
        if args.dashboard:
            board = Dashboard(context)
            with live(console, board):
                video = rollout(runtime, model.pipe, image, actions, args.seed, lambda i, s: board.update(s))
                # the last frame closes at detach: shown before the live view's final render, not after
                snapshot = final_snapshot(runtime)
                board.update(snapshot)
        else:
            with Progress(TextColumn("latent frames"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=err, transient=True, disable=not err.is_terminal) as progress:
                # disabled off a terminal: transient there, it left an empty line in the log
                task = progress.add_task("rollout", total=len(actions))
                video = rollout(runtime, model.pipe, image, actions, args.seed,
                                lambda i, s: progress.advance(task))
    finally:
        if snapshot is None:
            snapshot = final_snapshot(runtime)
    fps = args.fps or GIF_FPS
    gif = Path(out) if Path(out).suffix.lower() == ".gif" else None
    # all or none: a trace that failed to write (a full disk) left the new GIF in place of the old one, exit 1
    with written_together(gif, trace) as (gif_pending, trace_pending):
        if trace_pending is not None:
            write_trace(snapshot, context, trace_pending)
        if gif_pending is not None:
            write_frames(video, gif_pending, fps)
            written = [gif]
        else:  # numbered PNGs, a set written at once (media._write_sequence): last, after all else is written
            written = write_frames(video, out, fps)
    console.print(f"wrote {len(video)} frame{'s' if len(video) != 1 else ''} to {written[0]}" + (f" … {written[-1]}" if len(written) > 1 else ""))
    if written[0].suffix.lower() == ".gif" and abs(1000 / gif_frame_ms(fps) - fps) > 0.05 * fps:
        console.print(f"note: the GIF plays at {1000 / gif_frame_ms(fps):.3g} fps, not {fps:g}: it stores whole "
                      f"1/100 s delays, and viewers play one under 2/100 s at 10 fps (PNG frames keep every frame "
                      f"for a video tool: -o frames.png)")
    if trace is not None:
        console.print(f"wrote the trace to {trace} (open in https://ui.perfetto.dev or `residency dashboard`)")
    report_speed(console, snapshot, other, _calibrate_hint(args, len(actions)))
    if args.calibrate:
        print_line(console)(calibrate_session(runtime, replan.profile).line())
    return 0
