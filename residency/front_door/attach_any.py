"""`residency.attach(model, vram=…)`: the workload, the profile, the plan and the attached Runtime in one call.

For a diffusers or transformers model, any nn.Module (its workload from one counted forward of its example
inputs), our WorldModelPipeline (its catalog entry) and a diffusers pipeline (residency.attach_pipeline).
The long form — workload, PlanRequest, policy, Runtime — stays there for those who want a step of it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from itertools import chain
from typing import Any

import torch
from torch import nn

from policies import PlanRequest, fits_memory, get_policy
from residency.device import DeviceProfile, machine_profile, resolve_profile
from residency.errors import BudgetError, InferenceOnlyWarning, PlanWarning, ResidencyError
from residency.front_door.checks import backend_name, warn_budget_beyond_device, warn_missed_budget
from residency.front_door.examples import derived_example, is_instance_of
from residency.front_door.foreign_hooks import refuse_foreign_hooks, refuse_pipeline_hooks
from residency.front_door.pinned_planner import (
    OUTSIDE_READS,
    PinnedPlanner,
    bound_blocks,
    grouped_reasons,
)
from residency.front_door.shape_guard import ShapeGuard
from residency.front_door.vram import COMPUTE_FORMAT, VramSpec, frame_budget_ms, vram_bytes
from residency.plan import Budget, Plan, load_plan
from residency.runtime import DeviceBudgetExceeded, Runtime
from residency.runtime.attached_guards import refuse_inference_parameters
from residency.runtime.closed_loop import LoopOptions, check_loop_can_replan, enable_loop, loop_options
from residency.runtime.hooks import has_hook
from residency.units import first_names, fmt_bytes, plural, size_at_least
from residency.validate import a_type
from residency.workload import Workload, module_workload, workload_from_dict
from residency.workload.from_module import (
    DTYPE_NAMES,
    dominant_dtype,
    parameter_bytes_by_dtype,
    split_example,
)


def attach(target: Any, *, vram: VramSpec = None, fps: float | None = None, frame_ms: float | None = None,
           profile: str | os.PathLike[str] | DeviceProfile = "auto", backend: str = "auto", policy: str = "ours",
           example_inputs: Any = None, plan: Plan | str | os.PathLike[str] | None = None,
           closed_loop: bool | LoopOptions = False) -> Runtime:
    """Plan `target` for this machine and attach a Runtime to it; leaving the runtime (`with` or detach())
    restores the model bit for bit.

    vram: bytes, a size ("12GiB") or a share of the weights at the model's compute dtype ("50%"); None:
    the profile's usable memory. fps (video frames per second) or frame_ms (ms per latent frame, for a
    plain model: per forward call): a time budget; neither: the best quality within 10 % (or 1 ms) of the
    fastest plan that fits. profile: "auto" (this machine's, measured once and cached:
    residency.device.machine_profile), a shipped name, a path or a DeviceProfile. backend: "auto" (the GPU if torch sees one), "cpu" or "cuda". example_inputs:
    one call's inputs (a tensor, a tuple, or a dict of keyword inputs) at the shapes you will run —
    required for a plain nn.Module; calls at other shapes are refused. For a diffusers pipeline: the
    keyword arguments of the call to plan for (prompt, height, width, num_inference_steps …). plan: a Plan (or its JSON path)
    to run instead of planning; it must be made for this model's workload.

    closed_loop: False (the default: the plan stays as made, so a forward is as deterministic as the plan),
    True (re-plan when calls miss the budget or the prediction, with the defaults of LoopOptions: after K=4
    misses in a row, ±15 % margin, at least M=24 calls between decisions, no cap on switches) or a
    LoopOptions (e.g. LoopOptions(max_switches=2) caps it; enabled=False turns it off). Its decisions are in
    `runtime.loop.events` and the telemetry's events.

    Weights must be on the CPU in fp32, fp16 or bf16. The dtype of most parameter bytes is the plan's compute
    dtype; tensors a model keeps in another of the three (a bf16 Wan's fp32 norms and time embedder, a fp16 T5's
    fp32 `wo`, as from_pretrained loads them) stay in their own dtype: stored, streamed and computed in it, and
    never quantized — a quantized block quantizes only its tensors in the main dtype. So are floating buffers
    (running states, position tables), in the dtype they compute in. The plan's bytes count them at their own
    size.
    While attached, the blocks' weights live in the runtime's memory: edit them (load_state_dict, .to(), an
    in-place change of a weight) after detach(); the first two are refused while attached, and after an
    in-place change the next call is refused (detach undoes the change). Buffers a block updates in its own forward (a
    running state) are kept. On the CPU backend torch's intra-op threads are one fewer than the cores while
    attached (the copy thread has the last one); detach gives the count back.
    A diffusers pipeline is attached whole by residency.attach_pipeline (its runtime, a context manager too).
    Raises ResidencyError for closed_loop with a `plan` made for another profile (it cannot be re-planned).
    """
    if plan is not None and not isinstance(plan, (Plan, str, os.PathLike)):  # before tracing the model
        raise ResidencyError(f"plan={plan!r:.60} ({type(plan).__name__}) is not a plan",
                             hint="give a Plan (runtime.plan, residency.make_plan(…)) or the path of a plan JSON "
                                  "(`residency plan -o`), or leave plan= out to plan this model")
    loop_options(closed_loop)  # before tracing and attaching: a wrong value leaves the model as it was
    if is_instance_of(target, "diffusers", "DiffusionPipeline"):
        return _attach_pipeline(target, vram=vram, fps=fps, frame_ms=frame_ms, profile=profile, backend=backend,
                                policy=policy, example_inputs=example_inputs, plan=plan, closed_loop=closed_loop)
    if not isinstance(target, nn.Module):
        raise ResidencyError(f"residency.attach got a {type(target).__name__}, not a model",
                             hint="pass a torch nn.Module (a diffusers or transformers model, any module), "
                                  "a diffusers pipeline or a WorldModelPipeline")
    if has_hook(target):  # before planning: its counted forward would run through the other runtime
        raise ResidencyError(f"{type(target).__name__} is attached to a runtime already",
                             hint="detach() that runtime (or leave its `with` block) first; without it at hand: "
                                  "residency.detach(model)")
    inner = next((n for n, m in target.named_modules() if n and has_hook(m)), None)
    if inner is not None:  # before planning too: a tight budget said "no plan fits", hiding this
        raise ResidencyError(f"{type(target).__name__}.{inner} is attached to another runtime",
                             hint="detach() that runtime (or leave its `with` block; residency.detach(that part) "
                                  "without it at hand) first, then attach the whole model")
    refuse_foreign_hooks(target, type(target).__name__)
    _refuse_unhookable(target)
    refuse_inference_parameters(target)  # before planning (Runtime.attach checks again, for every caller)
    _warn_training_statistics(target)
    chosen_backend = backend_name(backend)
    prof = _profile(profile, chosen_backend)
    dtype = _compute_dtype(target)
    workload, guard = _workload(target, example_inputs, dtype)
    budget = Budget(vram_bytes(vram, workload.nbytes(COMPUTE_FORMAT[dtype]), prof.memory_usable_bytes),
                    frame_budget_ms(fps, frame_ms, workload.video_frames_per_latent))
    warn_budget_beyond_device(budget.vram_bytes, prof)
    # the model's own tensors (a ViT's class token) enclose its blocks: the planner keeps them resident
    replan = PinnedPlanner(get_policy(policy), PlanRequest(workload, prof, budget, compute_dtype=dtype))
    chosen = _given_plan(plan, workload) if plan is not None else _planned(replan, budget, prof)
    if plan is not None:
        _warn_budget_ignored(chosen, budget, vram=vram, fps=fps, frame_ms=frame_ms)
    check_loop_can_replan(closed_loop, chosen, prof)
    if chosen.profile_fingerprint != prof.fingerprint():
        replan = None  # a plan made for another profile runs as given; recovery needs plans for one profile
    elif workload.kv_cache_bytes():  # re-plans keep the KV dtype a running session's cache was built in
        replan = dataclasses.replace(replan, request=dataclasses.replace(replan.request, kv_dtype=chosen.kv_dtype))
    runtime = Runtime(chosen, chosen_backend, workload=workload, replan=replan,
                      profile=prof if replan is not None else None)
    runtime.call_check = _with_training_check(guard, target)
    try:
        runtime.attach(target)
    except DeviceBudgetExceeded as e:
        if plan is None:
            raise
        # its hint said "raise the budget", which vram= does not do for a given plan: its own budget is the one
        raise BudgetError(f"plan= does not fit its own budget ({fmt_bytes(chosen.budget.vram_bytes)}, plan.budget."
                          f"vram_bytes): {e.message}", hint="vram= does not change a given plan's budget: give the plan "
                          "a larger one (dataclasses.replace(plan, budget=residency.Budget(vram_bytes=…))), or leave "
                          "plan= out to plan for vram=") from None
    enable_loop(runtime, closed_loop)
    return runtime


def _attach_pipeline(pipe: Any, **options: Any) -> Any:
    components = {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}
    refuse_pipeline_hooks(pipe, components)
    call = options.pop("example_inputs")  # for a pipeline: the keyword arguments of the call to plan for
    if call is not None and not isinstance(call, dict):
        raise ResidencyError(f"example_inputs for the pipeline {type(pipe).__name__} is {a_type(call)}",
                             hint="give the call to plan for as a dict of pipe(...) arguments, e.g. "
                                  "dict(prompt='a cat', height=512, width=512, num_inference_steps=4)")
    try:
        from residency.attach_pipeline import attach_pipeline
    except ModuleNotFoundError as e:
        if e.name != "residency.attach_pipeline":
            raise
        raise ResidencyError(f"residency cannot attach a whole {type(pipe).__name__} yet",
                             hint="attach each component, e.g. residency.attach(pipe.transformer, vram=…, "
                                  "example_inputs=…)") from None
    chosen_backend = backend_name(options.pop("backend"))
    return attach_pipeline(pipe, backend=chosen_backend, call=call,
                           **{**options, "profile": _profile(options["profile"], chosen_backend)})


def _with_training_check(guard: Any, model: nn.Module) -> Any:
    """The call check, plus a warning (once) when a batch norm is switched to training mode after attaching:
    its running statistics would stop being kept, silently. Cost: one attribute per batch norm per call."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return guard
    warned = [any(m.training for m in norms)]  # already said at attach

    def check(args: tuple, kwargs: dict) -> None:
        if not warned[0] and any(m.training for m in norms):
            warned[0] = True
            warnings.warn(f"{type(model).__name__} was put in training mode while attached: batch norm's running "
                          "statistics are not kept by the runtime; call model.eval(), or detach() to train",
                          InferenceOnlyWarning, stacklevel=4)
        if guard is not None:
            guard(args, kwargs)

    return check


def _warn_training_statistics(model: nn.Module) -> None:
    """Batch norms in training mode update their running statistics in place: a streamed block's buffers are
    copies the runtime does not write back (after two calls a running mean read [0, 0] against the plain
    model's [-0.046, 0.018]). The runtime is for inference: say so before planning."""
    tracking = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and m.training and m.track_running_stats]
    if tracking:
        warnings.warn(f"{type(model).__name__} is in training mode: the running statistics of {tracking[0]}"
                      f"{f' and {len(tracking) - 1} more batch norms' if len(tracking) > 1 else ''} would update "
                      "in place with every call, and the runtime does not keep them, in resident blocks either (batch norm writes them "
                      "without bumping their version counters, which is how it sees a block's own writes); call "
                      "model.eval() before attaching (the runtime is for inference)", InferenceOnlyWarning,
                      stacklevel=3)
        return
    dropping = [n for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)
                and m.training and m.p > 0]
    if dropping:
        warnings.warn(f"{type(model).__name__} is in training mode: {dropping[0]}"
                      f"{f' and {len(dropping) - 1} more dropouts' if len(dropping) > 1 else ''} drop activations "
                      "at random, so no two calls give the same output; call model.eval() before attaching (the "
                      "runtime is for inference)", InferenceOnlyWarning, stacklevel=3)


def _profile(profile: str | os.PathLike[str] | DeviceProfile, backend: str) -> DeviceProfile:
    if isinstance(profile, str) and profile == "auto":
        return machine_profile("cpu" if backend == "cpu" else "cuda")
    return resolve_profile(profile)


def _refuse_unhookable(model: nn.Module) -> None:
    """Refuse, before any planning, what residency cannot place or hook: TorchScript (its forward is compiled
    code: no module call of a block runs Python), parameters a lazy module has not initialised yet (no shape to
    plan), complex parameters (not a weight format residency stores). Each had failed deep in torch."""
    name = type(model).__name__
    if isinstance(model, torch.jit.ScriptModule):
        raise ResidencyError(f"{name} is a TorchScript module: its blocks run as compiled code, which residency "
                             "cannot hook to place their weights",
                             hint="attach the nn.Module itself, before torch.jit.script or torch.jit.trace")
    # a scripted part (layers built as torch.jit.script(Block())): it failed as "did not run on the example inputs
    # (register_forward_pre_hook is not supported on ScriptModules)", with a hint about the inputs' shapes
    # (one with no tensors, a scripted activation, runs as it is: nothing of it is placed)
    scripted = next((path for path, m in model.named_modules() if path and isinstance(m, torch.jit.ScriptModule)
                     and any(True for _ in chain(m.parameters(), m.buffers()))), None)
    if scripted is not None:
        part = model.get_submodule(scripted)
        raise ResidencyError(f"{name}.{scripted} is a TorchScript module (a scripted "
                             f"{getattr(part, 'original_name', type(part).__name__)}): its calls run as compiled code, "
                             "which residency cannot hook to place its weights",
                             hint="build that part as the nn.Module itself (without torch.jit.script or "
                                  "torch.jit.trace), then attach the model")
    quantized = next((path for path, m in model.named_modules()
                      if type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized"))), None)
    if quantized is not None:  # its weights are packed in an op's private format: no parameter to place
        raise ResidencyError(f"{name}.{quantized or '(the model)'} is a torch.ao quantized module "
                             f"({type(model.get_submodule(quantized)).__name__}): its weights are packed for its own "
                             "kernels, not parameters residency can place or stream",
                             hint="attach the float model: residency stores its blocks quantized itself (Q8_0, "
                                  "Q4_K, … chosen per block by the plan)")
    for path, t in chain(model.named_parameters(), model.named_buffers()):
        if isinstance(t, nn.Parameter) and not (t.is_floating_point() or t.is_complex()):
            raise ResidencyError(f"{name}.{path} is a parameter of {str(t.dtype).removeprefix('torch.')}: residency "
                                 "places floating-point weights (a cast to the compute dtype would turn these "
                                 "values into floats)",
                                 hint="hold it as a buffer instead (module.register_buffer), which residency keeps "
                                      "as it is")
        if isinstance(t, nn.parameter.UninitializedTensorMixin):
            raise ResidencyError(f"{name}.{path} is not initialised yet (a lazy module, e.g. nn.LazyLinear, takes "
                                 "its shape from its first input)",
                                 hint="run the model once on an example before attaching it")
        if t.is_complex():
            raise ResidencyError(f"{name}.{path} is {str(t.dtype).removeprefix('torch.')}: residency stores real "
                                 "weights (float32, float16, bfloat16) only",
                                 hint="attach the part of the model with real weights, or keep this model unattached")
        leaf = path.rpartition(".")[2]
        if not isinstance(t, nn.Parameter) and t.is_floating_point() and t.dtype not in DTYPE_NAMES:
            # a buffer keeps its own dtype (never quantized), but only one of the three residency stores
            raise ResidencyError(f"{name}.{path} is a {str(t.dtype).removeprefix('torch.')} buffer: residency keeps "
                                 "a model's floating buffers in their own dtype, of float32, float16 and bfloat16 "
                                 "only", hint=f"cast it before attaching (`module.{leaf} = module.{leaf}.float()` keeps it "
                                 "a registered buffer), or hold it as a plain attribute, which residency leaves alone")


def _compute_dtype(model: nn.Module) -> str:
    """The model's main dtype (of most parameter bytes): the plan's compute dtype. Parameters in another of
    fp32, fp16 and bf16 (diffusers' and transformers' `_keep_in_fp32_modules`) keep theirs; any other is refused."""
    found = parameter_bytes_by_dtype([model])
    if not found:
        raise ResidencyError(f"{type(model).__name__} has no floating-point parameters",
                             hint="residency places weights; attach a model that has them")
    odd = sorted(str(d).removeprefix("torch.") for d in found if d not in DTYPE_NAMES)
    if odd:
        shown = ", ".join(sorted(str(d).removeprefix("torch.") for d in found))
        raise ResidencyError(f"{type(model).__name__} holds parameters in {shown}; the runtime stores and computes "
                             f"weights in float32, float16 or bfloat16, not {', '.join(odd)}",
                             hint="cast the model first, e.g. model.to(torch.bfloat16) (or torch.float32 on the CPU)")
    return dominant_dtype(found)


def _workload(model: nn.Module, example_inputs: Any, dtype: str) -> tuple[Workload, ShapeGuard | None]:
    """The model's workload and, for a forward built at the example's shapes, the guard of those shapes."""
    if is_instance_of(model, "pipelines.world_model", "WorldModelPipeline"):
        from pipelines.world_model.workload import catalog_entry

        return workload_from_dict(catalog_entry(model.config)), None
    example = example_inputs if example_inputs is not None else derived_example(model)
    label = type(model).__name__
    _refuse_empty_example(example, label)
    workload = module_workload(model, example, name=label, compute_dtype=dtype).workload
    args, kwargs = split_example(example)
    return workload, ShapeGuard.for_example(model, label, args, kwargs)



def _refuse_empty_example(example: Any, label: str) -> None:
    """An example whose first tensor has no elements (x[:0]) plans for calls of nothing, and every real call is then refused as
    larger than it ("4 against 0"): said at attach, where the example is given."""
    from torch.utils._pytree import tree_flatten

    # the first tensor only: it carries the batch; another may be empty on purpose (a cache of no past tokens)
    empty = next((t for t in tree_flatten(example)[0] if isinstance(t, torch.Tensor)), None)
    if empty is not None and empty.numel() == 0:
        raise ResidencyError(f"an example input of {label} has no elements (shape {tuple(empty.shape)}): the plan is "
                             "sized by the example, and every call larger than it is refused",
                             hint="give example_inputs of the batch and sizes the model will be called with")


# device memory every plan holds whatever it does with the weights (simulate.memory's kinds)
FIXED_KINDS = ("workspace", "activations", "kv_cache", "graph_pool")


def _least_memory(plan: Plan, replan: PinnedPlanner, budget: Budget, profile: DeviceProfile) -> Plan:
    """Of the planner's answer that does not fit and the plan streaming every block one at a time at the compute
    dtype, the one needing less memory: what the no-fit error quotes. The planner's answer may be a packed plan
    whose dequant scratch needs more than plain streaming (3.09 MiB quoted where 2.02 MiB fitted). A peer's policy
    asked for by name is quoted as it is: what it needs, not what another policy would (all-resident's error
    quoted 1.13 MiB under a 3.21 MiB budget)."""
    if plan.policy != "ours":
        return plan
    try:
        # with the blocks that must stay bound kept resident, as any plan the runtime runs
        one_by_one = PinnedPlanner(get_policy("accelerate-sequential"), replan.request)(budget, profile)
    except ResidencyError:
        return plan
    if plan.prediction is None or (one_by_one.prediction is not None and one_by_one.prediction.peak_total_bytes
                                   < plan.prediction.peak_total_bytes):
        return one_by_one
    return plan


def _planned(replan: PinnedPlanner, budget: Budget, profile: DeviceProfile) -> Plan:
    plan = replan(budget, profile)
    if not fits_memory(plan):
        w = replan.request.workload
        fmt = COMPUTE_FORMAT[replan.request.compute_dtype]
        # the slot holds the largest block that can stream: one kept resident whatever the plan needs none
        bound = bound_blocks(w)
        largest = max([b for b in w.blocks if b.name not in bound] or w.blocks, key=lambda b: b.nbytes(fmt))
        least = _least_memory(plan, replan, budget, profile)
        need = least.prediction.peak_total_bytes if least.prediction else None
        kinds = sorted(((k, n) for k, n in least.prediction.peak_bytes.items() if n and k != "reserve"),
                       key=lambda kn: -kn[1])[:3] if least.prediction else []
        parts = f" ({', '.join(f'{k} {fmt_bytes(n)}' for k, n in kinds)})" if kinds else ""
        give = f"vram={size_at_least(need)!r} or more" if need is not None else "a larger vram="
        # several modules are one block when they share a tensor or are small siblings called in a row: the
        # grouping is named, not a cause guessed (it said "they share a tensor" of siblings that share none)
        several = (f" ({len(largest.modules)} modules, {largest.modules[0]} … {largest.modules[-1]}, planned as one)"
                   if len(largest.modules) > 2 else "")
        hint = (f"give {give} (its largest block, {largest.name}{several}, is {fmt_bytes(largest.nbytes(fmt))} in {fmt}"
                f"{_mostly(largest, fmt)}: every streamed block needs a slot that holds it)"
                # one tensor (an embedding table) is the least the runtime moves: no smaller blocks to ask for
                + (", or a model of more, smaller blocks" if len(largest.tensors) > 1 else ""))
        if plan.policy != "ours":  # a peer's placement: the slot advice is ours
            hint = (f"give {give} ({plan.policy}'s plan needs that), or leave policy={plan.policy!r} out: "
                    "residency's own planner streams and packs blocks to fit")
        fixed = {k: n for k, n in (plan.prediction.peak_bytes.items() if plan.prediction else ())
                 if k in FIXED_KINDS and n}
        # most of what the smallest plan needs is memory no placement of the weights changes: say that
        if need is not None and sum(fixed.values()) >= max(budget.vram_bytes, need / 2):
            shown = ", ".join(f"{k} {fmt_bytes(n)}" for k, n in sorted(fixed.items(), key=lambda kn: -kn[1]))
            hint = (f"what no plan can stream or pack ({shown}) needs {fmt_bytes(sum(fixed.values()))} before any "
                    f"weight: give vram={size_at_least(need)!r} or more (a share like \"100%\" counts "
                    "the weights only)")
        pinned = _pinned_words(w, fmt, need, bound)
        if pinned and need is not None and pinned[1] >= need / 2:  # most of it is blocks that cannot stream
            hint += f"; the blocks kept resident cannot stream: {pinned[2]}"
        raise BudgetError(f"no plan of {w.name} fits vram={budget.vram_bytes} bytes "
                             f"({fmt_bytes(budget.vram_bytes)}) on profile {profile.name!r}"
                             + (f": the smallest plan found needs {_exact(need, budget.vram_bytes)}{parts}"
                                if need is not None else "") + (pinned[0] if pinned else ""), hint=hint)
    warn_missed_budget(plan)
    return plan


def _pinned_words(w: Workload, fmt: str, need: int | None, why: dict[str, str]) -> tuple[str, int, str] | None:
    """(what the no-fit error says of the blocks that must stay resident whatever the plan — PinnedPlanner's —,
    their bytes, why they cannot stream, for the hint), or None when there are none: a model whose every block is
    pinned was told to give "a model of more, smaller blocks", its real cause unnamed. `why`: bound_blocks(w)."""
    if not why:
        return None
    nbytes = sum(w.by_name[n].nbytes(fmt) for n in why)
    names = list(why)
    outside = "the model reads their tensors outside their own calls (a buffer updated after the block returns, a " \
              "weight another layer reads)"
    enclose = "they enclose other blocks, which the runtime reads through the whole call"
    kinds = {r == OUTSIDE_READS for r in why.values()}
    cannot = " or ".join(c for c, k in ((outside, True), (enclose, False)) if k in kinds)
    return (f"; {plural(len(names), 'block')} ({first_names(names)}, {fmt_bytes(nbytes)}) must stay resident whatever "
            f"the plan: {grouped_reasons(why)}"), nbytes, cannot


def _mostly(block, fmt: str) -> str:
    """", most of it NAME (SIZE)" when one tensor is at least half of a block of several (a position-embedding
    buffer sized for the largest image): the tensor to look at, which no smaller block would hold less of."""
    if len(block.tensors) < 2:
        return ""
    sizes = [(math.prod(shape), name) for name, shape in block.tensors]
    total = sum(n for n, _ in sizes)
    n, name = max(sizes)
    if not total or 2 * n < total:
        return ""
    return f", most of it {name} ({fmt_bytes(block.nbytes(fmt) * n // total)})"


def _exact(need: int, budget_bytes: int) -> str:
    """`need` as fmt_bytes shows it, with its bytes when that reads the same as the budget's."""
    shown = fmt_bytes(need)
    return f"{shown} ({need} bytes)" if shown == fmt_bytes(budget_bytes) else shown


def _warn_budget_ignored(chosen: Plan, asked: Budget, **given: Any) -> None:
    """plan= runs as given: a vram=/fps=/frame_ms= that asks for another budget than the plan's is said to be
    ignored (it used to be, silently)."""
    named = [k for k, v in given.items() if v is not None]
    differs = (("vram" in named and asked.vram_bytes != chosen.budget.vram_bytes)
               or (any(k in named for k in ("fps", "frame_ms")) and asked.frame_ms != chosen.budget.frame_ms))
    if differs:
        warnings.warn(f"plan= runs as given, with its own budget ({fmt_bytes(chosen.budget.vram_bytes)}"
                      + (f", {chosen.budget.frame_ms:.1f} ms" if chosen.budget.frame_ms else "")
                      + f"): {', '.join(f'{k}=' for k in named)} ignored; leave plan= out to plan for them",
                      PlanWarning, stacklevel=3)


def _given_plan(plan: Plan | str | os.PathLike[str], workload: Workload) -> Plan:
    chosen = plan if isinstance(plan, Plan) else load_plan(plan)
    chosen.check_matches(workload, f"model {workload.name}",
                         fix="leave plan= out to plan this model; or give a plan that an attach of this same model, "
                             "with the same example inputs, made (its runtime.plan, or the file residency.save_plan "
                             "wrote of it)")
    return chosen
