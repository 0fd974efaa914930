"""A diffusers pipeline under a plan: its text encoders, denoiser and VAE decoder as the phases of one
workload, one Runtime over all of them, so an encoder can be evicted, kept packed on the device or streamed.

`attach_pipeline(pipe, vram=…, profile=…)` is what `residency.attach` does for a `DiffusionPipeline`.
"""

from __future__ import annotations

import difflib
import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from residency.batch_guard import PlannedBatch, batch_arguments, batch_guard, planned_batches
from residency.device import DeviceProfile, machine_profile, resolve_profile
from residency.errors import PlanWarning, ResidencyError
from residency.front_door.checks import backend_name, warn_budget_beyond_device, warn_missed_budget
from residency.front_door.foreign_hooks import refuse_pipeline_hooks
from residency.front_door.offload_guards import OffloadGuards
from residency.front_door.pinned_planner import PinnedPlanner, unpinned_enclosing
from residency.front_door.pipeline_call import effective_size, schedule_given, steps_of
from residency.front_door.vram import COMPUTE_FORMAT, VramSpec, vram_bytes
from residency.plan import Budget, Plan, load_plan
from residency.runtime import Runtime
from residency.runtime.attached_guards import refuse_inference_parameters
from residency.runtime.closed_loop import LoopOptions, check_loop_can_replan, enable_loop, loop_options
from residency.runtime.ledger import DeviceBudgetExceeded
from residency.runtime.not_pickled import NotCopiedRuntime
from residency.runtime.structure_watch import LABEL_KEY
from residency.telemetry.calibration import WARMUP_FRAMES
from residency.units import fmt_bytes, size_at_least
from residency.workload import ModuleWorkloadWarning, Workload, module_workload
from residency.workload.from_module import DTYPE_NAMES, dominant_dtype, error_line, parameter_bytes_by_dtype
from residency.workload.left_as_found import generators_in, left_as_found
from residency.workload.pipeline_phases import ComponentCall, ComponentPart, join_phases

# Which pipeline attributes run in which phase, and the method the pipeline calls on them.
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
DENOISERS = ("transformer", "unet")
ROLES = (*((c, "encode", False, "forward") for c in ENCODERS),
         *((c, "denoise", True, "forward") for c in DENOISERS),
         ("vae", "decode", False, "decode"))  # txt2img runs only the VAE's decoder; its encoder stays unplanned
# The call's arguments that change the workload (token counts, steps); a prompt's length is bounded by
# max_sequence_length, to which the text encoders pad.
SHAPE_ARGUMENTS = ("height", "width", "num_inference_steps", "max_sequence_length", "num_images_per_prompt",
                   "num_frames")  # a video's frames: a causal VAE decodes per latent frame (its calls change: exact)
# Of those, the ones a call may ask less of than the plan was made for: fewer pixels, images or prompt tokens make
# every activation smaller and leave the calls as they were (steps change the calls: those must match)
AT_MOST = ("height", "width", "num_images_per_prompt", "max_sequence_length")
# The call's arguments that make its activations smaller, where the pipeline takes them (a hint names those only)
COUNTS = ("num_frames", "batch_size", "num_images_per_prompt")  # of a call's arguments that can be smaller: counts
SMALLER_BY = ("height", "width", *COUNTS)
# A prompt for a pipeline that takes one and was given none (nor its embeddings); the pipeline's own defaults
# for the rest. An unconditional or class-conditional pipeline (DDPM, DiT) takes no prompt and is given none.
DEFAULT_CALL = {"prompt": "a photo of a cat"}
PROMPT_GIVEN_BY = ("prompt", "prompt_embeds")


class PipelineModules(nn.Module):
    """The pipeline's planned components as children named by their pipeline attribute, so every block's
    path is `<component>.<path in it>`; calling it calls the pipeline (the runtime's unit of retry)."""

    def __init__(self, pipe: Any, components: Mapping[str, nn.Module]):
        super().__init__()
        for name, module in components.items():
            self.add_module(name, module)  # shared with the pipeline, not copied
        self.__dict__["pipe"] = pipe  # not a module: kept out of the tree
        self.__dict__[LABEL_KEY] = type(pipe).__name__  # what messages call it (structure_watch.model_label)
        self.rewind: list[tuple[torch.Generator, torch.Tensor]] = []  # generator states at the call's start
        self.planned: dict[str, PlannedBatch] = {}  # per component, the batch planned for (residency.batch_guard)
        self.batch_set_by: tuple[str, ...] = ()  # the call's arguments that set the batch (batch_guard's message)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # a retry after an out-of-memory calls this again: the generators restart where the call began,
        # so the retried call draws the same noise
        """Rewind the pipeline's generators to the call's start, then call the pipeline.

        A retry after an out-of-memory thus draws the same noise as the failed attempt.
        """
        for gen, state in self.rewind:
            gen.set_state(state)
        with batch_guard(dict(self.named_children()), self.planned, self.batch_set_by):
            return self.pipe(*args, **kwargs)


def _defaults_taken(pipe: Any, call: Mapping[str, Any]) -> dict[str, Any]:
    """DEFAULT_CALL's arguments the pipeline's call takes by name and `call` does not give (no prompt where
    prompt_embeds are given)."""
    takes = _call_parameters(pipe)  # none to read: give only what the user gave
    if any(k in call for k in PROMPT_GIVEN_BY):
        return {}
    return {k: v for k, v in DEFAULT_CALL.items() if k in takes}


def _generator_states(generator: Any) -> list[tuple[torch.Generator, torch.Tensor]]:
    return [(g, g.get_state()) for g in generators_in(generator)]


@dataclass(frozen=True)
class PipelineWorkload:
    """A pipeline described for the planner: its workload, module tree, weight dtype and planned call."""
    workload: Workload
    modules: PipelineModules
    compute_dtype: str  # the components' main weight dtype ("fp32", "bf16", "fp16"); others keep their own
    call: dict[str, Any]  # the pipeline call the workload was built for (its shapes)


def _components(pipe: Any) -> list[tuple[str, nn.Module, str, bool, str]]:
    found = []
    for name, phase, per_step, method in ROLES:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            found.append((name, module, phase, per_step, method))
    if not any(phase == "denoise" for _, _, phase, _, _ in found):
        raise ResidencyError(f"{type(pipe).__name__} has no denoiser ({' or '.join(DENOISERS)} attribute)",
                             hint="attach the pipeline's model itself: residency.attach(model, example_inputs=…)")
    return found


@dataclass(frozen=True)
class Captured:
    """What one real call of the pipeline showed: each component's first call inputs and its calls per denoise
    step (the encoders' and the decoder's: per call), and the denoise steps the call runs when they differ from
    its num_inference_steps (img2img runs strength × steps), else None."""
    inputs: dict[str, tuple[tuple, dict, int]]
    steps_run: int | None
    order: tuple[str, ...] = ()  # the components in the order the call ran them, one entry a call


def _capture(pipe: Any, components: list[tuple[str, nn.Module, str, bool, str]],
             call: Mapping[str, Any]) -> Captured:
    """One real call of the pipeline with one denoise step (its cost: the encoders, one denoiser step and the
    decode, on the CPU here), recording each component's calls. A denoiser called twice a step (guidance run as
    two forwards) is two passes a step. A pipeline that cannot run one step (img2img at strength < 1 runs
    int(1 × strength) = 0 of them; PixArt's one-step branch) is run again at the call's own step count, its
    denoiser calls divided by the steps it ran (the pipeline's num_timesteps)."""
    order: list[str] = []
    one_step: Exception | None = None
    if schedule_given(call) is None:  # timesteps or sigmas given set the steps whatever num_inference_steps says
        try:
            return Captured(_run_recorded(pipe, components, {**call, "num_inference_steps": 1}, order), None,
                            tuple(order))
        except Exception as first:  # noqa: BLE001  (a denoiser never called included: the call at its own steps says)
            one_step = first
        order.clear()
    try:
        inputs = _run_recorded(pipe, components, call, order)
    except ResidencyError:
        raise
    except Exception as e:  # the pipeline's own error on the call: most often the call's arguments
        raise ResidencyError(f"{type(pipe).__name__} did not run on the call given for planning ({error_line(e)})",
                             hint="example_inputs= is the keyword arguments of the pipeline's call, as "
                                  f"pipe(**example_inputs) runs it; check them against {type(pipe).__name__}'s "
                                  "documented arguments") from e
    asked, run = steps_of(pipe, call), getattr(pipe, "_num_timesteps", None)
    steps = run if isinstance(run, int) and run > 0 else asked
    per_step = {n for n, _, _, every_step, _ in components if every_step}
    if one_step is not None:
        warnings.warn(f"{type(pipe).__name__} did not run one denoise step ({error_line(one_step)}): planned from a "
                      f"call at its own {steps} step(s), which took longer", PlanWarning, stacklevel=3)
    return Captured({n: (a, k, max(1, c // steps) if n in per_step else c) for n, (a, k, c) in inputs.items()},
                    steps if steps != asked else None, tuple(order))


def _check_steps(pipe: Any, steps: int, given: bool) -> None:
    """Refuse a call of more denoise steps than a plan covers (MAX_STEPS: the simulator walks every block of a
    per-step pass each step) — the steps it runs (img2img: strength × num_inference_steps), known after the one-step
    capture — naming the argument and where its value came from (DDPMPipeline defaults to 1000: "steps must be from
    1 to 64, got 1000" said neither)."""
    from residency.workload.spec import MAX_STEPS

    if steps > MAX_STEPS:
        source = "given" if given else f"{type(pipe).__name__}'s default"
        raise ResidencyError(f"the call runs {steps} denoise steps (num_inference_steps {source}): residency plans up to "
                             f"{MAX_STEPS} per call", hint=f"attach with example_inputs=dict(num_inference_steps=N), "
                             f"N ≤ {MAX_STEPS}, and call the pipeline with that many steps (a scheduler such as DDIM "
                             "samples a 1000-step model in far fewer)")


def _run_recorded(pipe: Any, components: list[tuple[str, nn.Module, str, bool, str]],
                  call: Mapping[str, Any], order: list[str]) -> dict[str, tuple[tuple, dict, int]]:
    """Each component's first call inputs and its calls in one real call `pipe(**call)` (output as numpy); each
    call's component is appended to `order` as it runs."""
    seen: dict[str, tuple[tuple, dict]] = {}
    calls: dict[str, int] = {}
    wrapped = []
    for name, module, _, _, method in components:
        inner = getattr(module, method)

        def record(*args: Any, _name: str = name, _inner: Callable = inner, **kwargs: Any) -> Any:
            seen.setdefault(_name, (args, kwargs))
            calls[_name] = calls.get(_name, 0) + 1
            order.append(_name)
            return _inner(*args, **kwargs)
        module.__dict__[method] = record  # an instance attribute, removed below
        wrapped.append((module, method))
    # the user's own call: its generators and the global RNG are put back after it (a seeded call given again
    # then draws the noise the plain pipeline would), and what the components cache or count in it
    try:
        with torch.inference_mode(), left_as_found([m for _, m, *_ in components], generators_in(call)):
            pipe(**{"output_type": "np", **call})  # the call's own output_type: "latent" runs no VAE
    finally:
        for module, method in wrapped:
            del module.__dict__[method]
    missing = [n for n, *_ in components if n not in seen]
    if not any(phase == "denoise" and n in seen for n, _, phase, _, _ in components):
        raise ResidencyError(f"{type(pipe).__name__}: components {missing} were not called by the pipeline",
                             hint="pass the call arguments that run the denoiser (e.g. prompt=…, output_type='np')")
    if missing:  # text encoders skipped for prompt_embeds, a VAE for output_type="latent": planned without them
        warnings.warn(f"{type(pipe).__name__}: {', '.join(missing)} did not run in the call planned for; "
                      "left out of the plan, they run as they are (their own weights and device) when a call "
                      "runs them", PlanWarning, stacklevel=4)
    return {n: (*seen[n], calls[n]) for n in seen}


def _by_name(method: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments all by keyword: from_module's example is positional or keyword, not both."""
    bound = inspect.signature(method).bind(*args, **kwargs)
    out: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        kind = bound.signature.parameters[key].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            raise ResidencyError(f"{getattr(method, '__qualname__', method)} was called with *{key}",
                                 hint="its inputs cannot be named: build its workload with module_workload")
        out.update(value if kind is inspect.Parameter.VAR_KEYWORD else {key: value})
    return out


def _compute_dtype(components: list[tuple[str, nn.Module, str, bool, str]]) -> str:
    """The dtype of most of the components' parameter bytes: the plan's compute dtype. Weights in another of
    fp32, fp16 and bf16 (a fp32 VAE beside a bf16 transformer, fp32 norms) keep their own dtype."""
    found = parameter_bytes_by_dtype(m for _, m, *_ in components)
    odd = [d for d in found if d not in DTYPE_NAMES]
    if not found or odd:
        raise ResidencyError(f"the pipeline's components hold weights in {sorted(map(str, found))}",
                             hint="residency stores float32, float16 and bfloat16 weights: cast the others first, "
                                  "e.g. pipe.to(torch.bfloat16)")
    return dominant_dtype(found)


def pipeline_workload(pipe: Any, call: Mapping[str, Any] | None = None, name: str | None = None) -> PipelineWorkload:
    """The pipeline's workload at the shapes of `call` (the keyword arguments of `pipe(...)`; what matters is
    SHAPE_ARGUMENTS — a prompt is padded to max_sequence_length): encode → denoise × steps → decode."""
    check_call_names(pipe, call or {})
    given = "num_inference_steps" in (call or {}) or schedule_given(call or {}) is not None
    call = {**_defaults_taken(pipe, call or {}), **(call or {})}
    components = _components(pipe)
    refuse_pipeline_hooks(pipe, {name: module for name, module, *_ in components})
    captured = _capture(pipe, components, call)
    inputs = captured.inputs
    components = [c for c in components if c[0] in inputs]  # those the call ran (_run_recorded says which not)
    dtype = _compute_dtype(components)
    parts = []
    for comp, module, phase, per_step, method in components:
        args, kwargs, calls = inputs[comp]
        with warnings.catch_warnings():
            if method != "forward":  # the VAE's encoder never runs in text-to-image: left out on purpose
                warnings.simplefilter("ignore", ModuleWorkloadWarning)
            # weights in another dtype than the pipeline's main one (a fp32 VAE) keep theirs
            traced = module_workload(ComponentCall(comp, module, method), _by_name(getattr(module, method), args, kwargs),
                                     name=comp, component=comp, compute_dtype=dtype, weights_dtype=dtype)
        parts.append(ComponentPart(comp, phase, per_step, traced.workload, calls))
    title = name or type(pipe).__name__
    steps = captured.steps_run or steps_of(pipe, call)
    _check_steps(pipe, int(steps), given)
    workload = join_phases(title, parts, int(steps),
                           source=f"{type(pipe).__name__}: " + ", ".join(p.component for p in parts),
                           call_order=captured.order)
    modules = PipelineModules(pipe, {c: m for c, m, *_ in components})
    modules.planned = planned_batches(inputs, {c: method for c, _, _, _, method in components})
    modules.batch_set_by = batch_arguments(_call_parameters(pipe))  # read once, not on every call
    return PipelineWorkload(workload, modules, dtype, call)


class PipelineRuntime(NotCopiedRuntime):
    """The runtime attached to a pipeline's components. Call it as the pipeline (`rt(prompt, …)`), or call
    the pipeline itself: both run under the plan, but only a call through the runtime has its shapes checked
    and is retried whole after an out-of-memory (its generators rewound: the retry draws the same noise).
    A context manager: leaving it restores the pipeline bit for bit."""

    def __init__(self, runtime: Runtime, built: PipelineWorkload):
        self.runtime, self.built = runtime, built
        self._offload_guards = OffloadGuards(built.modules.pipe, runtime)

    @property
    def plan(self) -> Plan:
        """The plan the runtime executes (a new one after a re-plan)."""
        return self.runtime.plan

    @property
    def workload(self) -> Workload:
        """The workload the plan was made for."""
        return self.built.workload

    @property
    def loop(self):
        """The closed loop (residency.runtime.closed_loop.ClosedLoop), None when off: its decisions in .events."""
        return self.runtime.loop

    def telemetry(self):
        """The runtime's telemetry snapshot (frames, calls, the closed loop's events)."""
        return self.runtime.telemetry()

    @property
    def attached(self) -> bool:
        """Whether the runtime holds the pipeline now (Runtime.attached)."""
        return self.runtime.attached

    @property
    def budget_bytes(self) -> int:
        """The device budget in force (Runtime.budget_bytes)."""
        return self.runtime.budget_bytes

    def set_budget(self, budget_bytes: int | str) -> None:
        """The device budget changed (Runtime.set_budget): a cut below use re-plans at the next block call."""
        self.runtime.set_budget(budget_bytes)

    def replan_now(self) -> Plan:
        """Plan again for the budget in force and run that plan from the next call on (Runtime.replan_now)."""
        self._attached()
        return self.runtime.replan_now()

    def calibrated_profile(self, warmup_frames: int = WARMUP_FRAMES):
        """The running plan's profile fitted to the frames the runtime recorded (Runtime.calibrated_profile)."""
        return self.runtime.calibrated_profile(warmup_frames)

    def _attached(self) -> None:
        if self.runtime.pipeline is None:  # a detached runtime ran the pipeline plain, silently
            raise ResidencyError("this pipeline runtime is not attached (detached)",
                                 hint="attach again: `with residency.attach(pipe, …) as rt:`")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._attached()
        check_call_names(self.built.modules.pipe, kwargs)
        self._check_shapes(kwargs)
        modules = self.built.modules
        modules.rewind = _generator_states(kwargs.get("generator"))  # a retry rewinds to them
        try:
            # a pipeline's call never trains (diffusers decorates __call__ with torch.no_grad itself): no
            # InferenceOnlyWarning on every call, as a world model's step
            with torch.no_grad():
                return modules(*args, **kwargs)
        finally:
            modules.rewind = []

    def _check_shapes(self, kwargs: Mapping[str, Any]) -> None:
        """A call at other shapes than the plan's would run under a plan made for others: refused. Each
        argument as the pipeline takes it: given, else its signature's default."""
        pipe = self.built.modules.pipe
        defaults = _call_parameters(pipe)
        for key in SHAPE_ARGUMENTS:
            if key not in defaults:
                continue
            if key == "num_inference_steps":  # the steps run: timesteps or sigmas given set them
                planned, asked = steps_of(pipe, self.built.call), steps_of(pipe, kwargs)
            else:
                planned = effective_size(pipe, key, self.built.call.get(key, defaults[key].default))
                asked = effective_size(pipe, key, kwargs.get(key, defaults[key].default))
            if key in AT_MOST and _count(asked) and _count(planned) and asked <= planned:
                continue  # smaller activations, the same calls: the plan's figures bound it
            if asked != planned:
                raise ResidencyError(
                    f"the plan was made for {key}={planned}, this call asks {key}={asked}",
                    hint=f"attach again for it: residency.attach(pipe, example_inputs=dict({key}={asked}, …)) "
                         f"(attach_pipeline's call=)")

    def detach(self) -> None:
        """Restore the pipeline's weights and modules exactly; safe to call twice.

        Raises ForwardReplacedError (a RuntimeError) when another library wrapped a forward after attaching.
        """
        self.runtime.detach()
        self._offload_guards.remove()

    def __enter__(self) -> PipelineRuntime:
        self._attached()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attach_pipeline(pipe: Any, *, vram: VramSpec = None, fps: float | None = None, frame_ms: float | None = None,
                    profile: str | os.PathLike[str] | DeviceProfile = "auto", backend: str = "cpu",
                    policy: str = "ours", plan: Plan | str | os.PathLike[str] | None = None,
                    call: Mapping[str, Any] | None = None, closed_loop: bool | LoopOptions = False) -> PipelineRuntime:
    """Plan the pipeline's components as one workload (encode → denoise × steps → decode) for `call`'s
    shapes (pipe(**call): prompt, height, width, num_inference_steps, …) and attach one Runtime to them.

    `vram`: bytes, "12GiB" or a share of the planned weights at their own dtype ("50%"); None: the
    profile's usable memory. `fps`/`frame_ms`: images per second / ms per image (None: the fastest plan
    that fits). `plan`: a Plan or its JSON path, run instead of planning. `closed_loop`: False (default: the
    plan stays fixed), True (re-plan when images miss the budget or the prediction, LoopOptions' defaults) or a
    LoopOptions (`max_switches` caps it); each pipeline call is one unit. Cost: one real call of the pipeline
    with one denoise step, to find each component's input shapes.

    The dtype of most of the components' parameter bytes is the compute dtype; weights in another of fp32, fp16
    and bf16 (a fp32 VAE beside a bf16 transformer, a transformer's fp32 norms) keep their own dtype, stored and
    computed in it and never quantized (residency.attach says more)."""
    if fps is not None and frame_ms is not None:
        raise ResidencyError("both fps and frame_ms given", hint="give one: frame_ms = 1000 / fps")
    if fps is not None and not fps > 0:
        raise ResidencyError(f"fps={fps}", hint="a positive number of images per second")
    loop_options(closed_loop)  # before the pipeline's recorded call: a wrong value costs nothing
    for _name, module, *_ in _components(pipe):  # and before it, what attach would refuse after planning
        refuse_inference_parameters(module)
    built = pipeline_workload(pipe, call)
    prof = _profile(profile, backend)
    weights = built.workload.nbytes(COMPUTE_FORMAT[built.compute_dtype])
    budget = Budget(vram_bytes(vram, weights, prof.memory_usable_bytes),
                    1000.0 / fps if fps is not None else frame_ms)
    warn_budget_beyond_device(budget.vram_bytes, prof)
    given = load_plan(plan) if isinstance(plan, str | os.PathLike) else plan
    return attach_built(built, budget, profile=prof, backend=backend, policy=policy, plan=given,
                        closed_loop=closed_loop)


def attach_built(built: PipelineWorkload, budget: Budget, *, profile: str | os.PathLike[str] | DeviceProfile = "auto",
                 backend: str = "cpu", policy: str = "ours", plan: Plan | None = None,
                 closed_loop: bool | LoopOptions = False) -> PipelineRuntime:
    """attach_pipeline's second half, for a workload already built: plan (unless `plan` is given; it must
    be one for this workload and profile) and attach; re-plans go through `policy`. `closed_loop` as in
    attach_pipeline; with it, a plan made for another profile raises ResidencyError (nothing stays attached)."""
    from policies import PlanRequest, get_policy

    loop_options(closed_loop)  # before attaching (enable_loop detaches again on a wrong value, after the work)
    prof = _profile(profile, backend)
    request = PlanRequest(built.workload, prof, budget, compute_dtype=built.compute_dtype)
    planner = PinnedPlanner(get_policy(policy), request)
    first = plan if plan is not None else planner(budget, prof)
    need = first.prediction.peak_total_bytes if first.prediction else 0
    if need > budget.vram_bytes:
        params = _call_parameters(built.modules.pipe)
        smaller = [k for k in SMALLER_BY if k in params and not _at_least(k, built.call, params)]
        raise DeviceBudgetExceeded(
            f"no {first.policy} plan of {built.workload.name} fits {fmt_bytes(budget.vram_bytes)}: the best needs "
            f"{fmt_bytes(need)} for the shapes of {_shapes(built.modules.pipe, built.call)}",
            hint=f"give vram={size_at_least(need)!r} or more" + (f", or plan for a smaller call: example_inputs=dict({', '.join(f'{k}=…' for k in smaller)}) "
                                      "with residency.attach (call= with attach_pipeline)" if smaller else ""))
    warn_missed_budget(first)
    wrong = unpinned_enclosing(first, built.workload)
    if wrong:
        raise ResidencyError(f"the plan keeps {', '.join(wrong)} as {', '.join(wrong.values())}",
                             hint="blocks enclosing others, and blocks whose tensors the model reads outside their calls, must be "
                                  "resident for the session")
    check_loop_can_replan(closed_loop, first, prof)
    if first.profile_fingerprint != prof.fingerprint():
        planner = None  # a plan made for another profile runs as given; re-plans need plans for one profile
    runtime = Runtime(first, backend, workload=built.workload, replan=planner,
                      profile=prof if planner is not None else None).attach(built.modules)
    enable_loop(runtime, closed_loop)
    return PipelineRuntime(runtime, built)


def check_call_names(pipe: Any, call: Mapping[str, Any]) -> None:
    """A name the pipeline's call would swallow silently (its **kwargs) that is close to one of its own (`hieght`):
    a typo, refused. Names far from all of them (a deprecated callback) pass on to the pipeline as given."""
    params = _call_parameters(pipe)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # the pipeline refuses an unknown name itself
    named = [k for k, p in params.items() if p.kind not in (inspect.Parameter.VAR_KEYWORD,
                                                             inspect.Parameter.VAR_POSITIONAL)]
    for key in call:
        close = difflib.get_close_matches(key, named, n=1) if key not in named else None
        if close:
            raise ResidencyError(f"{type(pipe).__name__}'s call has no argument {key!r} (did you mean {close[0]!r}?)",
                                 hint=f"its **kwargs would take {key!r} and ignore it: name the argument as "
                                      f"{type(pipe).__name__}.__call__ does")


def _at_least(key: str, call: Mapping[str, Any], params: Mapping[str, inspect.Parameter]) -> bool:
    """Whether the call's `key` (given, else the pipeline's default) is a count already at its least, 1: a hint to
    plan for a smaller batch_size=… read as advice when the call's batch was 1 already. Sizes (height, width) and
    counts defaulting to None (the pipeline decides) are never at their least here."""
    value = call.get(key, params[key].default)
    return key in COUNTS and isinstance(value, int) and value <= 1


def _call_parameters(pipe: Any) -> Mapping[str, inspect.Parameter]:
    """The named parameters of the pipeline's call (none where it has no signature to read)."""
    try:
        return inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return {}


def _shapes(pipe: Any, call: Mapping[str, Any]) -> str:
    given = [f"{k}={call[k]}" for k in (*SHAPE_ARGUMENTS, "batch_size") if k in call]
    if "height" not in call and "height" in _call_parameters(pipe):
        given.append("the pipeline's default height and width")
    return ", ".join(given) or "the pipeline's defaults"


def _profile(profile: str | os.PathLike[str] | DeviceProfile, backend: str) -> DeviceProfile:
    backend_name(backend)  # a GPU backend torch cannot see: said before a profile is measured for it
    if isinstance(profile, str) and profile == "auto":  # this machine's cached, measured profile
        return machine_profile("cpu" if backend == "cpu" else "cuda")
    return resolve_profile(profile)


def _count(value: Any) -> bool:
    """A whole number ≥ 1 (not a bool, not None: a pipeline's default left to its config)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
