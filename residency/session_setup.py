"""The set-up `residency run`, `play` and `demo` share: the world model, its plan on this machine, the attached runtime.

Commands keep their arguments and their output; this module turns those arguments into a running session.
torch, the pipelines, the planner (its MILP solver), the runtime and the dashboard are imported inside the
functions that use them: the CLI imports this module at start, and those imports cost seconds there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from residency import userpath
from residency.errors import ResidencyError, UsageError
from residency.units import plural
from residency.validate import did_you_mean

if TYPE_CHECKING:  # each imports torch (and planning the MILP solver): imported where they are used
    from pipelines.world_model import WorldModelPipeline
    from policies import Replanner
    from residency.dashboard import DashboardContext
    from residency.device import DeviceProfile
    from residency.device.profile import Calibration
    from residency.plan import Plan
    from residency.runtime import Runtime
    from residency.telemetry import TelemetrySnapshot
    from residency.workload import Workload

NEEDS_REAL_WEIGHTS = ("lucid-500m", "lucid-800m")  # random weights of this size cost GBs and show noise
# Below 1 MiB no block of any model fits: the smallest --vram the CLI accepts (arg_types.MIN_VRAM_BYTES).
MIN_ROOM_BYTES = 2**20


class Console(Protocol):
    """Where the set-up's notes go: a rich Console (stderr for the commands)."""

    def print(self, *objects: object) -> None:
        """Print `objects` as rich does (markup allowed)."""
        ...


@dataclass(frozen=True)
class Model:
    """A world model ready to plan: the pipeline, its workload and what the commands tell the user about it."""

    pipe: WorldModelPipeline  # float32 on the CPU (the runtime places it)
    workload: Workload  # of the pipeline's config
    label: str  # what the user sees
    start_image: np.ndarray | None  # the default model's first held-out start image
    sensitivity: dict | None  # measured block × format loss, when shipped
    note: str | None  # e.g. the fallback to random weights


def trained_dir() -> Path:
    """Where the shipped trained model lives (pipelines/world_model/trained)."""
    from pipelines.world_model.trained import DEFAULT_DIR

    return DEFAULT_DIR


def has_trained_weights() -> bool:
    """The one check for the shipped model: its weights file is present."""
    return (trained_dir() / "model.safetensors").is_file()


def shipped_sensitivity() -> dict | None:
    """The shipped model's measured block × format loss table, None when it has none (or no weights)."""
    if not has_trained_weights() or not (trained_dir() / "sensitivity.json").is_file():
        return None
    from pipelines.world_model import trained

    return trained.sensitivity()


def compute_dtype_for(gpu: bool) -> str:
    """What the matmuls run in: bf16 on a GPU, fp32 on the CPU backend (a CPU without bf16 units runs bf16
    matmuls slower than fp32), for `run` here and for `plan` on a profile of that kind."""
    return "bf16" if gpu else "fp32"


def fallback_image(h: int, w: int) -> np.ndarray:
    """A deterministic colour ramp: tiny's random weights give noise anyway; this only needs the right size."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) * 127 // max(1, h + w - 2)],
                    axis=-1).astype(np.uint8)


def load_model(name: str) -> Model:
    """`default` (the shipped trained model, else tiny), `tiny`, or a saved pipeline directory or file.

    Raises ResidencyError (exit 1, as for an unknown profile) for an unknown name, a path that is no saved
    pipeline, or a catalog model that ships no weights."""
    import torch

    from pipelines.world_model import WorldModelPipeline
    from pipelines.world_model.workload import catalog_entry
    from residency.workload import workload_from_dict

    note, start, sensitivity = None, None, None
    if name == "default" and has_trained_weights():
        from pipelines.world_model import trained

        pipe, label = trained.load_default(dtype=torch.float32), "default (trained)"
        start = trained.start_images()[0]
        sensitivity = shipped_sensitivity()
    elif name in ("default", "tiny"):
        pipe, label = WorldModelPipeline.from_config("tiny"), "tiny (random weights)"
        if name == "default":
            note = (f"the trained model is not in {trained_dir()} yet: using tiny with random weights "
                    "(frames are noise; the plan and the runtime are real)")
            start = fallback_image(pipe.config.height, pipe.config.width)
    else:
        kind = check_model_name(name)
        if kind != userpath.DIRECTORY:  # refuses a FIFO (open() would block), a device, a name the OS refuses
            userpath.require_file(name, "a saved pipeline", hint="give a saved pipeline directory or a "
                                  ".safetensors/.gguf file (WorldModelPipeline.save_pretrained)")
            _refuse_document(Path(name))
        else:
            _refuse_foreign_model_dir(Path(name))
        pipe, label = WorldModelPipeline.from_pretrained(name), Path(name).name
    workload = workload_from_dict(catalog_entry(pipe.config))
    return Model(pipe, workload, label, start, sensitivity, note)


def check_model_name(name: str) -> str:
    """Refuse a model name `load_model` cannot load before anything is loaded: a catalog model (no weights) or a name
    that is neither a preset nor a path (exit 2, with "did you mean"). Returns the path's kind (userpath). `play`
    asks first: off a terminal, a typo was reported as the missing terminal."""
    from pipelines.catalog import catalog_paths  # as sources.catalog_names lists it (which imports us)
    from pipelines.world_model import PRESETS

    if name in NEEDS_REAL_WEIGHTS:
        raise ResidencyError(f"{name} needs real weights to run; residency ships none for it",
                             hint=f"plan it with `residency plan {name} --profile …`; run `default` or `tiny`, "
                             "or a saved pipeline directory")
    kind, _ = userpath.path_kind(name)
    if kind != userpath.MISSING or name in ("default", "tiny"):
        return kind
    if name in catalog_paths():
        raise ResidencyError(f"{name} is a catalog model: its architecture, for planning, with no weights; `run` "
                             "rolls out a world model it can load",
                             hint=f"plan it with `residency plan {name} --profile …`; run `default`, `tiny` or a "
                             "saved pipeline directory; a diffusers pipeline runs under residency.attach(pipe) "
                             "in Python")
    # a name not known is a mistake in the command line (exit 2), as plan's and an unknown profile's
    raise UsageError(f"unknown model {name[:200]!r}{did_you_mean(name, ['default', *PRESETS])}",
                     hint="default, tiny, or the path of a saved pipeline (WorldModelPipeline.save_pretrained); "
                     f"{', '.join(p for p in PRESETS if p in NEEDS_REAL_WEIGHTS)} ship no weights: plan "
                     "them with `residency plan`")


def _refuse_document(path: Path) -> None:
    """A plan, profile, catalog entry or trace given where the model goes (`run plan.json`): said as what it is and
    where it goes, not "unknown checkpoint extension '.json'"."""
    from residency.checkpoint.sniff import JSON, file_kind
    from residency.jsonfile import read_json
    from residency.validate import document_kind, use_of

    if file_kind(path) != JSON:
        return
    hint = "give the model first — default, tiny or a saved pipeline — and this file where it goes"
    kind = document_kind(read_json(path, "a JSON document", hint))
    if kind is None:
        raise ResidencyError(f"{path}: a JSON document, not a model", hint=hint)
    use = use_of(kind)
    raise ResidencyError(f"{path}: this is {kind}, not a model",
                         hint=f"{use}, with a model first (`residency run default --plan FILE`)" if kind.startswith(
                             "a plan") else (use or hint))


def _refuse_foreign_model_dir(path: Path) -> None:
    """A diffusers or transformers model (or pipeline) directory given to `run`: say what run rolls out and where such
    a model goes instead (it holds no world model, and "no .safetensors" or "no world model config" misleads)."""
    from residency.commands.config_source import is_diffusers_pipeline_dir, is_model_dir, is_world_model_dir

    kind = ("a diffusers pipeline directory" if is_diffusers_pipeline_dir(path) else
            "a diffusers or transformers model directory" if is_model_dir(path) else None)
    try:
        weights = any(p.suffix.lower() in (".safetensors", ".gguf") for p in path.iterdir())
    except OSError:  # unreadable: the checkpoint reader names why
        weights = True
    if kind is None and not is_world_model_dir(path) and not weights:
        # the checkpoint reader's "point at a checkpoint file or shard directory" named none of what run takes
        raise ResidencyError(f"{path}: no saved world-model pipeline here (no config.json of one, no .safetensors "
                             "or .gguf file)", hint="give default, tiny, a directory WorldModelPipeline."
                             "save_pretrained wrote, or its .safetensors/.gguf file")
    if kind is not None:
        raise ResidencyError(f"{path}: {kind}; `run` rolls out world-model pipelines (default, tiny, or one saved by "
                             "WorldModelPipeline.save_pretrained)",
                             hint=f"plan it with `residency plan {path}` (or inspect it); in Python, "
                             "residency.attach(model_or_pipeline) runs it under a plan")


def start_image(model: Model, path: str | None) -> np.ndarray:
    """The image at `path` (resized checks by read_image), else the model's own; UsageError when it has none."""
    from residency.media import read_image

    c = model.pipe.config
    if path is not None:
        return read_image(path, c.height, c.width)
    if model.start_image is None:
        raise UsageError(f"model {model.label} needs a start image",
                         hint=f"give --image with a {c.width}x{c.height} picture; `residency run default --frames 1 "
                         "-o start.png` writes one, as start-0000.png: then --image start-0000.png")
    return model.start_image


def device_kind() -> str:
    """`cuda` when torch sees a GPU (CUDA or ROCm), else `cpu`."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cached_profile(kind: str, console: Console) -> DeviceProfile:
    """This machine's profile (residency.device.machine_profile), its notes on the console."""
    import residency.device as device  # measure_profile looked up at call time: tests stand in for it

    return device.machine_profile(kind, say=console.print, measure=device.measure_profile)


def default_vram_bytes(usable_bytes: int, workload: Workload, console: Console) -> int:
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
    if room < MIN_ROOM_BYTES:
        raise ResidencyError(f"{fmt_bytes(available)} of RAM is available and the host store alone needs "
                             f"{fmt_bytes(store)}: nothing is left for the model's device memory",
                             hint="close other programs or raise the container's memory limit")
    if room < usable_bytes:
        # said only where it may bind (under twice the weights): on every CPU run it was noise (RAM free now is
        # always below what the profile found), and a few KiB under read "20.5 GiB … below the profile's 20.5 GiB"
        if room < 2 * store and fmt_bytes(room) != fmt_bytes(usable_bytes):
            console.print(f"note: device budget {fmt_bytes(room)}: the RAM available now less the host store "
                          f"({fmt_bytes(store)}), below the profile's {fmt_bytes(usable_bytes)}")
        return room
    return usable_bytes



def make_plan(model: Model, console: Console, *, plan_path: str | None = None, profile: str | None = None,
              fps: float | None = None, vram_bytes: int | str | None = None,
              image_path: str | None = None, kv_dtype: str | None = None) -> tuple[Model, Plan, Replanner | None]:
    """The model to run, the plan and its replanner: `plan_path` loaded and checked against the model (no
    replanner), the model set to the plan's denoise steps (a plan of `residency plan --steps N`; its sampler ran
    the config's steps, so such a plan was refused, and a plan whose steps were edited ran unchanged, silently);
    or planned now with policy `ours` for `profile` (a name, a path or "calibrated": see resolve_for; default
    this machine's cached measurement), `fps` video frames per second and `vram_bytes` (default: `default_vram_bytes`;
    a share such as "50%" is of the model's weights at the compute dtype planned for). `image_path`: the --image
    given, quoted in hints that name a command to run. `kv_dtype`: the KV cache's dtype (None: the planner's choice);
    the replanner keeps the first plan's, which a running session's cache was built in."""
    if plan_path:
        from residency.commands.loaded_plan import load_for

        model, plan = load_for(model, plan_path, kv_dtype)
        return model, plan, None
    from policies import PlanRequest, Replanner, get_policy
    from residency.front_door.vram import frame_budget_ms
    from residency.plan import Budget

    frame_ms = frame_budget_ms(fps, None, model.workload.video_frames_per_latent)  # fps checked by argparse
    device_profile = (resolve_for(model, profile, console, image_path) if profile
                      else cached_profile(device_kind(), console))
    compute_dtype = compute_dtype_for(device_kind() != "cpu")
    if vram_bytes is None:
        vram_bytes = default_vram_bytes(device_profile.memory_usable_bytes, model.workload, console)
    else:
        if isinstance(vram_bytes, str):
            from residency.commands.arg_types import resolve_vram
            from residency.simulate.memory import GPU_WORKSPACE_BYTES

            vram_bytes = resolve_vram(vram_bytes, model.workload, compute_dtype,
                                      GPU_WORKSPACE_BYTES if device_profile.is_gpu else 0)
        if vram_bytes > device_profile.memory_usable_bytes:  # as `plan` says it (`run` said nothing)
            from residency.units import fmt_bytes

            console.print(f"note: --vram {fmt_bytes(vram_bytes)} is more than {device_profile.name} has to use "
                          f"({fmt_bytes(device_profile.memory_usable_bytes)}): planned for it as asked, and the "
                          "run may run out of device memory; leave --vram out to plan for what it has",
                          markup=False, highlight=False)
    req = PlanRequest(model.workload, device_profile, Budget(vram_bytes, frame_ms),
                      sensitivity=model.sensitivity, compute_dtype=compute_dtype, kv_dtype=kv_dtype)
    policy = get_policy("ours")
    plan = policy(req)
    # re-plans (a budget cut, the closed loop) keep the session's KV dtype: a plan storing the cache otherwise cannot
    # take over a running session (switch_plan refuses it)
    return model, plan, Replanner(policy, dataclasses.replace(req, kv_dtype=plan.kv_dtype))


def resolve_for(model: Model, profile: str, console: Console, image_path: str | None = None) -> DeviceProfile:
    """`--profile` for `model`: a shipped name or a path, or "calibrated" — this machine's cached profile as
    calibrated for the model (residency.device.profile_for; its notes on the console).

    Raises UsageError (exit 2) for "calibrated" without a calibration, ResidencyError for a bad name or file."""
    from residency.device import profile_for

    return profile_for(profile, model.workload.fingerprint(), kind=device_kind(),
                       model=model.label.split(" ", 1)[0], image=image_path or model.start_image is None,
                       say=console.print)


def attach(model: Model, plan: Plan, replan: Replanner | None, plan_path: str | None = None) -> Runtime:
    """The runtime attached to the model, the pipeline cast to the plan's compute dtype first. `plan_path`: the plan
    file the plan came from, named (exit 3, as the fit check says it) where the runtime finds it over its budget:
    a plan whose profile is not known here (measured again since) has no prediction to check beforehand, and it
    failed as a bare ledger error (exit 1)."""
    from residency.errors import BudgetError
    from residency.runtime import Runtime
    from residency.runtime.device_memory import TORCH_DTYPES
    from residency.runtime.ledger import DeviceBudgetExceeded
    from residency.units import fmt_bytes

    model.pipe.to(TORCH_DTYPES[plan.blocks[0].compute_dtype])
    try:
        return Runtime(plan, device_kind(), workload=model.workload, replan=replan,
                       profile=replan.profile if replan is not None else None).attach(model.pipe)
    except DeviceBudgetExceeded as e:
        if plan_path is None:
            raise
        raise BudgetError(f"{plan_path} does not fit its own {fmt_bytes(plan.budget.vram_bytes)} VRAM budget as "
                          f"this runtime holds it ({e.message})",
                          hint=f"make the plan again here: `residency plan {model.label.split(' ', 1)[0]} … -o "
                               f"{plan_path}` (with more --vram if it says so)") from None


def context_for(model: Model, plan: Plan, predicted_for: str | None = None) -> DashboardContext:
    """What the dashboard and the trace show beside the telemetry: title, budgets, frames per latent, and the
    other device the plan's predictions are for, if any (run_cmd.other_device)."""
    from residency.dashboard import DashboardContext

    return DashboardContext(title=f"{model.label} · {device_kind()} · plan {plan.policy} on {plan.profile}",
                            vram_budget_bytes=plan.budget.vram_bytes, frame_budget_ms=plan.budget.frame_ms,
                            video_frames_per_latent=model.workload.video_frames_per_latent,
                            predicted_for=predicted_for)


def rollout(runtime: Runtime, pipe: WorldModelPipeline, image: np.ndarray, actions: list[str], seed: int,
            on_frame: Callable[[int, TelemetrySnapshot], object]) -> list[np.ndarray]:
    """Step a session from `image` through `actions`; on_frame(i, snapshot) after each latent frame."""
    session = pipe.start(image, seed=seed)
    video: list[np.ndarray] = []
    for i, action in enumerate(actions):
        video.extend(runtime.step(session, action))
        on_frame(i, runtime.telemetry())
    return video


def final_snapshot(runtime: Runtime) -> TelemetrySnapshot:
    """Detach and return every recorded frame (the last closes at detach) with memory as held before it."""
    memory = runtime.telemetry().memory
    runtime.detach()
    return dataclasses.replace(runtime.telemetry(), memory=memory)


def enable_loop(runtime: Runtime, model: Model, say: Callable[[str], object] | None) -> None:
    """Turn the closed loop on with its default options (residency.runtime.closed_loop): re-plan when frames
    miss; `say` gets each decision as one line as it happens (None: not printed, e.g. the dashboard shows them).

    Raises ResidencyError for a runtime without a replanner (a plan from --plan stays fixed)."""
    from residency.runtime.closed_loop import LoopOptions

    report = None if say is None else (lambda event: say(event.line()))
    runtime.enable_closed_loop(LoopOptions(), model=model.workload.name, say=report)


@dataclass(frozen=True)
class CalibrationReport:
    """A calibration of a finished rollout, saved to the cache, with the prediction error it removed."""
    path: Path  # the calibrated profile's cache file
    frames: int  # latent frames fitted
    error_before: float  # median relative error of those frames vs the plan predicted with the starting profile
    error_after: float  # ... vs the same plan re-predicted with the calibrated profile (+0.031 = 3.1 % slower)
    summary: str  # the factors found (CalibrationFit.summary)
    kept: Calibration | None = None  # the cache's calibration on more frames, kept at `path`; this one not saved
    poor: bool = False  # the fit missed its own frames (fit_is_poor): not saved, the cache left as it was

    def line(self) -> str:
        """"calibrated profile saved to PATH (from N frames): prediction error before +36.2 %, after +3.1 %", or
        where the cache keeps a fit on more frames, the same figures and which file was kept."""
        errors = (f"prediction error before {self.error_before * 100:+.1f} %, after {self.error_after * 100:+.1f} % "
                  "(the fitted frames' median against the plan predicted with the starting profile, then with the "
                  "calibrated one)")
        if self.poor:
            return (f"calibrated from {plural(self.frames, 'frame')} ({errors}), not saved: the fit does not predict "
                    f"the frames it was fitted on within {POOR_FIT_ERROR:.0%} — the machine's speed moved during the "
                    "run (another program busy?); run again on a quieter machine")
        if self.kept is None:
            return f"calibrated profile saved to {self.path} (from {plural(self.frames, 'frame')}): {errors}"
        from residency.device.calibrated import FULL_FIT_FRAMES

        return (f"calibrated from {plural(self.frames, 'frame')} ({errors}), not saved: {self.path} keeps its "
                f"calibration from {plural(self.kept.frames, 'frame')} of {self.kept.date} (a fit on "
                f"{FULL_FIT_FRAMES} frames or more "
                "replaces it)")


def calibrate_session(runtime: Runtime, start_profile: DeviceProfile) -> CalibrationReport:
    """Fit the profile to the frames the runtime ran (Runtime.calibrated_profile; detached or not), save the
    calibrated profile to the cache (residency.device.save_calibrated) and compare the fitted frames' measured
    work ms with the running plan as predicted by `start_profile` (the profile the session started with) and
    by the calibrated profile.

    Raises ResidencyError with too few frames, an absurd fit, or an unwritable cache."""
    from residency.device import save_calibrated
    from residency.device.calibrated import MIN_SAVED_FIT_FRAMES, better_cached, cache_path_of
    from residency.simulate import predict
    from residency.telemetry.calibration import WARMUP_FRAMES, calibration_window, prediction_errors

    fit = runtime.calibrated_profile()
    if fit.frames < MIN_SAVED_FIT_FRAMES:
        raise ResidencyError(f"a fit on {plural(fit.frames, 'frame')} is not saved (at least "
                             f"{MIN_SAVED_FIT_FRAMES} after the {WARMUP_FRAMES} of warm-up)",
                             hint=f"run {WARMUP_FRAMES + MIN_SAVED_FIT_FRAMES} latent frames or more")
    measured_ms = [f.frame_ms for f in calibration_window(runtime.telemetry(), since_s=runtime.plan_started_s).frames]
    before_ms, after_ms = (predict(runtime.workload, runtime.plan, p, bound=False).prediction.frame_ms
                           for p in (start_profile, fit.profile))
    before, after = prediction_errors(measured_ms, before_ms), prediction_errors(measured_ms, after_ms)
    if fit_is_poor(before, after):  # saved, it replaced a good calibration and misled every later plan
        return CalibrationReport(cache_path_of(fit.profile), fit.frames, before, after, fit.summary(), poor=True)
    kept = better_cached(fit.profile)
    path = save_calibrated(fit.profile) if kept is None else kept[0]
    return CalibrationReport(path, fit.frames, before, after, fit.summary(), None if kept is None else kept[1].calibration)


# A fit whose calibrated profile misses the very frames it was fitted on by more than this (their median) describes a
# machine that changed under the run: saving it replaced the cache's calibration with a worse one ("before -14.6 %,
# after +13.3 %", and the next run read +25 %). Only the fit's own error is judged: a few frames' "before" moves with
# the machine's noise as much as the fit does (3 frames read +0.7 % before, +6.7 % after on a quiet machine).
POOR_FIT_ERROR = 0.10


def fit_is_poor(before: float, after: float) -> bool:
    """Is a fit with these median errors on its own frames (before and after calibrating) not worth saving?"""
    return abs(after) > POOR_FIT_ERROR  # nan (nothing measured) compares False: saved, as before
