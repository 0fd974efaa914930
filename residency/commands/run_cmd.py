"""`residency run MODEL`: a headless rollout under a plan — frames to a GIF/PNGs, telemetry to a trace.

Also the set-up `play` and `demo` share: the model (trained default, tiny, or a saved pipeline), the
device profile (a cached measurement when none is given), the plan, and the attached runtime.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from residency import userpath
from residency.commands import arg_types
from residency.commands.actions import parse_actions
from residency.commands.console import make_console
from residency.errors import ResidencyError, UsageError

if TYPE_CHECKING:  # planning loads the MILP solver: imported where a plan is made
    from policies import PlanRequest
    from residency.device import DeviceProfile
    from residency.plan import Budget, Plan

DEFAULT_ACTIONS = "right*4,down*4,left*4,up*4"
GIF_FPS = 15.0  # playback rate of written GIFs when no --fps is given
NEEDS_REAL_WEIGHTS = ("lucid-500m", "lucid-800m")  # random weights of this size cost GBs and show noise
MAX_FRAMES = 100_000  # latent frames of one run: every video frame is held until the file is written


def add_model_arguments(p, plan_option: bool = True) -> None:
    """MODEL, image and planning options, shared by run, play and demo."""
    p.add_argument("model", metavar="MODEL", nargs="?", default="default",
                   help="default (the shipped trained model, or tiny), tiny, or a saved pipeline directory/file")
    p.add_argument("--image", metavar="PNG", help="start image at the model's size (default model: its first "
                   "held-out start image)")
    if plan_option:
        p.add_argument("--plan", metavar="PATH", help="a plan from `residency plan -o` (instead of planning here)")
    p.add_argument("--profile", metavar="NAME|PATH", help="device profile (default: this machine's, measured once "
                   "in quick mode and cached)")
    p.add_argument("--fps", type=arg_types.FPS, metavar="N", help="video frames per second to plan for")
    p.add_argument("--vram", type=arg_types.vram_size, metavar="SIZE", help="device memory the plan may use, "
                   "e.g. 20MiB (default: the profile's usable memory; on the CPU no more than the RAM "
                   "available now less the host store)")
    p.add_argument("--seed", type=arg_types.seed, default=0, help="noise seed of the session (0 to 2**64-1)")


def add_parser(sub) -> None:
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
    p.set_defaults(run=run)


# --- the model ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    pipe: object  # WorldModelPipeline, float32 on the CPU (the runtime places it)
    workload: object  # residency.workload.Workload of the pipeline's config
    label: str  # what the user sees
    start_image: np.ndarray | None  # the default model's first held-out start image
    sensitivity: dict | None  # measured block × format loss, when shipped
    note: str | None  # e.g. the fallback to random weights


def trained_dir() -> Path:
    from pipelines.world_model.trained import DEFAULT_DIR

    return DEFAULT_DIR


def has_trained_weights() -> bool:
    """The one check for the shipped model: its weights file is present."""
    return (trained_dir() / "model.safetensors").is_file()


def _fallback_image(h: int, w: int) -> np.ndarray:
    """A deterministic colour ramp: tiny's random weights give noise anyway; this only needs the right size."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) * 127 // max(1, h + w - 2)],
                    axis=-1).astype(np.uint8)


def load_model(name: str) -> Model:
    import torch

    from pipelines.world_model import PRESETS, WorldModelPipeline
    from pipelines.world_model.workload import catalog_entry
    from residency.workload import workload_from_dict

    note, start, sensitivity = None, None, None
    if name == "default" and has_trained_weights():
        from pipelines.world_model import trained

        pipe, label = trained.load_default(dtype=torch.float32), "default (trained)"
        start = trained.start_images()[0]
        with_sens = trained_dir() / "sensitivity.json"
        sensitivity = trained.sensitivity() if with_sens.is_file() else None
    elif name in ("default", "tiny"):
        pipe, label = WorldModelPipeline.from_config("tiny"), "tiny (random weights)"
        if name == "default":
            note = (f"the trained model is not in {trained_dir()} yet: using tiny with random weights "
                    "(frames are noise; the plan and the runtime are real)")
            start = _fallback_image(pipe.config.height, pipe.config.width)
    elif name in NEEDS_REAL_WEIGHTS:
        raise ResidencyError(f"{name} needs real weights to run; residency ships none for it",
                             hint=f"plan it with `residency plan {name} --profile …`; run `default` or `tiny`, "
                             "or a saved pipeline directory")
    else:
        kind, _ = userpath.path_kind(name)
        if kind == userpath.MISSING:
            raise UsageError(f"unknown model {name[:200]!r}",
                             hint="default, tiny, or the path of a saved pipeline "
                             f"(WorldModelPipeline.save_pretrained); presets {', '.join(PRESETS)}")
        if kind != userpath.DIRECTORY:  # refuses a FIFO (open() would block), a device, a name the OS refuses
            userpath.require_file(name, "a saved pipeline", hint="give a saved pipeline directory or a "
                                  ".safetensors/.gguf file (WorldModelPipeline.save_pretrained)")
        pipe, label = WorldModelPipeline.from_pretrained(name), Path(name).name
    workload = workload_from_dict(catalog_entry(pipe.config))
    return Model(pipe, workload, label, start, sensitivity, note)


def start_image(model: Model, path: str | None) -> np.ndarray:
    from residency.media import read_image

    c = model.pipe.config
    if path is not None:
        return read_image(path, c.height, c.width)
    if model.start_image is None:
        raise UsageError(f"model {model.label} needs a start image",
                         hint=f"give --image start.png ({c.width}x{c.height} pixels)")
    return model.start_image


# --- the device and the plan -------------------------------------------------------------------------------
def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cache_dir() -> Path:
    from residency.device.auto_profile import cache_dir as profile_cache_dir

    return profile_cache_dir()


def cached_profile_path(kind: str) -> Path:
    from residency.device import cached_profile_path as machine_profile_path

    return machine_profile_path(kind)


def cached_profile(kind: str, console):
    """This machine's profile (residency.device.machine_profile), its notes on the console."""
    import residency.device as device  # measure_profile looked up at call time: tests stand in for it

    return device.machine_profile(kind, say=console.print, measure=device.measure_profile)


def frame_budget_ms(fps: float | None, video_frames_per_latent: int) -> float | None:
    if fps is None:
        return None
    if not fps > 0:
        raise UsageError(f"--fps must be positive, got {fps}", hint="e.g. --fps 15")
    return 1000.0 * video_frames_per_latent / fps


def default_vram_bytes(usable_bytes: int, workload, console) -> int:
    """The budget when none is given: the profile's usable memory, on the CPU no more than the RAM free now.

    On the CPU backend the device memory and the host store share the RAM: the budget is at most the
    RAM available now (with the host store's headroom) less the store at the CPU's compute dtype (the
    largest it can be), however much the profile found free when it was measured.
    """
    if device_kind() != "cpu":
        return usable_bytes
    import residency.device.host_memory as host_ram
    from residency.runtime.host_store import HOST_HEADROOM
    from residency.units import fmt_bytes

    available = int(host_ram.host_memory().available_bytes * HOST_HEADROOM)
    store = workload.nbytes("F32")
    room = available - store
    if room < arg_types.MIN_VRAM_BYTES:
        raise ResidencyError(f"{fmt_bytes(available)} of RAM is available and the host store alone needs "
                             f"{fmt_bytes(store)}: nothing is left for the model's device memory",
                             hint="close other programs or raise the container's memory limit")
    if room < usable_bytes:
        console.print(f"note: device budget {fmt_bytes(room)}: the RAM available now less the host store "
                      f"({fmt_bytes(store)}), below the profile's {fmt_bytes(usable_bytes)}")
        return room
    return usable_bytes


def make_plan(model: Model, args, console, vram_bytes: int | None = None):
    """The plan to run: --plan loaded and checked against the model, or planned now with policy `ours`."""
    from residency.plan import load_plan

    if getattr(args, "plan", None):
        plan = load_plan(args.plan)
        plan.check_matches(model.workload, f"model {model.label}")
        return plan, None
    from policies import PlanRequest, get_policy
    from residency.device import resolve_profile
    from residency.plan import Budget

    frame_ms = frame_budget_ms(args.fps, model.workload.video_frames_per_latent)
    profile = resolve_profile(args.profile) if args.profile else cached_profile(device_kind(), console)
    vram = args.vram if args.vram is not None else vram_bytes  # bytes, parsed and bounded by arg_types
    if vram is None:
        vram = default_vram_bytes(profile.memory_usable_bytes, model.workload, console)
    req = PlanRequest(model.workload, profile, Budget(vram, frame_ms),
                      sensitivity=model.sensitivity, compute_dtype="fp32" if device_kind() == "cpu" else "bf16")
    replan = Replanner(get_policy("ours"), req)
    return replan.policy(req), replan


@dataclass(frozen=True)
class Replanner:
    """The runtime's replan(budget, profile): the policy again, on the request the first plan came from."""

    policy: Callable[[PlanRequest], Plan]
    request: PlanRequest

    @property
    def profile(self) -> DeviceProfile:
        """The profile the first plan was made for: the runtime re-plans with it."""
        return self.request.profile

    def __call__(self, budget: Budget, profile: DeviceProfile) -> Plan:
        return self.policy(dataclasses.replace(self.request, budget=budget, profile=profile))


def attach(model: Model, plan, replan: Replanner | None):
    """The runtime attached to the model, the pipeline cast to the plan's compute dtype first."""
    from residency.runtime import Runtime
    from residency.runtime.device_memory import TORCH_DTYPES

    model.pipe.to(TORCH_DTYPES[plan.blocks[0].compute_dtype])
    return Runtime(plan, device_kind(), workload=model.workload, replan=replan,
                   profile=replan.profile if replan is not None else None).attach(model.pipe)


def context_for(model: Model, plan):
    from residency.dashboard import DashboardContext

    return DashboardContext(title=f"{model.label} · {device_kind()} · plan {plan.policy} on {plan.profile}",
                            vram_budget_bytes=plan.budget.vram_bytes, frame_budget_ms=plan.budget.frame_ms,
                            video_frames_per_latent=model.workload.video_frames_per_latent)


def final_snapshot(runtime):
    """Detach and return every recorded frame (the last closes at detach) with memory as held before it."""
    memory = runtime.telemetry().memory
    runtime.detach()
    return dataclasses.replace(runtime.telemetry(), memory=memory)


def check_trace_path(path: str) -> Path:
    """Validated before any work, like the frames' path: a .json in an existing, writable directory."""
    from residency.media import check_writable_target

    p = Path(path)
    if p.suffix.lower() != ".json":
        raise UsageError(f"{p}: a trace is a .json file", hint="e.g. --trace trace.json (open it in Perfetto)")
    return check_writable_target(p)


def report_speed(console, snapshot) -> None:
    measured = snapshot.steady_frame_ms()
    if measured != measured:  # nan: too few frames for a steady median
        frames = [f for f in snapshot.frames if f.frame > 0]
        measured = frames[-1].frame_ms if frames else float("nan")
    predicted = snapshot.prediction.frame_ms if snapshot.prediction else None
    line = f"measured {measured:.1f} ms per latent frame"
    if predicted:
        line += f"; the plan predicted {predicted:.1f} ms ({(measured - predicted) / predicted:+.0%})"
    console.print(line)


# --- run ---------------------------------------------------------------------------------------------------
def rollout(runtime, pipe, image, actions, seed, on_frame) -> list[np.ndarray]:
    """Step the session through `actions`; on_frame(i, snapshot) after each latent frame."""
    session = pipe.start(image, seed=seed)
    video: list[np.ndarray] = []
    for i, action in enumerate(actions):
        video.extend(runtime.step(session, action))
        on_frame(i, runtime.telemetry())
    return video


def run(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from residency.dashboard import Dashboard, live, require_terminal, write_trace
    from residency.media import check_output_path, write_frames

    console, err = make_console(), make_console(stderr=True)
    if args.dashboard:
        require_terminal(console, "--dashboard")
    out = check_output_path(args.output)
    trace = check_trace_path(args.trace) if args.trace else None
    model = load_model(args.model)
    if model.note:
        err.print(f"note: {model.note}")
    script = parse_actions(args.actions, model.pipe.config.actions)
    actions = list(itertools.islice(itertools.cycle(script), args.frames or len(script)))
    image = start_image(model, args.image)
    plan, replan = make_plan(model, args, err)
    context = context_for(model, plan)
    runtime = attach(model, plan, replan)
    try:
        if args.dashboard:
            board = Dashboard(context)
            with live(console, board):
                video = rollout(runtime, model.pipe, image, actions, args.seed, lambda i, s: board.update(s))
        else:
            with Progress(TextColumn("latent frames"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=err, transient=True) as progress:
                task = progress.add_task("rollout", total=len(actions))
                video = rollout(runtime, model.pipe, image, actions, args.seed,
                                lambda i, s: progress.advance(task))
    finally:
        snapshot = final_snapshot(runtime)
    written = write_frames(video, out, args.fps or GIF_FPS)
    console.print(f"wrote {len(video)} frames to {written[0]}" + (f" … {written[-1]}" if len(written) > 1 else ""))
    if trace is not None:
        write_trace(snapshot, context, trace)
        console.print(f"wrote the trace to {trace} (open in https://ui.perfetto.dev or `residency dashboard`)")
    report_speed(console, snapshot)
    return 0
