"""A plan file given to run, play or demo: loaded and checked against the model it is run with, and its prediction
made again here, so the figures compared are this plan's."""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any

from residency.errors import ResidencyError, UsageError
from residency.units import fmt_bytes

if TYPE_CHECKING:
    from residency.plan import Plan
    from residency.session_setup import Model
    from residency.workload import Workload


def load_for(model: Model, plan_path: str, kv_dtype: str | None) -> tuple[Model, Plan]:
    """The plan in `plan_path`, checked against `model`, and the model to run it (set to the plan's denoise steps: a
    plan of `residency plan --steps N`; its sampler ran the config's steps, so such a plan was refused, and a plan whose
    steps were edited ran unchanged, silently). `kv_dtype`: a --kv-dtype given beside it, which must be the plan's."""
    from residency.plan import load_plan
    from residency.runtime.module_paths import check_block_formats

    name = model.label.split(" ", 1)[0]
    plan = load_plan(plan_path)
    check_block_formats(plan, plan_path)
    check_one_compute_dtype(plan, plan_path, name)
    if kv_dtype is not None and kv_dtype != plan.kv_dtype:
        raise UsageError(f"--kv-dtype {kv_dtype}, but {plan_path} stores the KV cache as {plan.kv_dtype}",
                         hint=f"leave --kv-dtype out to run the plan as made, or make it again with "
                              f"`residency plan … --kv-dtype {kv_dtype} -o {plan_path}`")
    same_name = plan.model == model.workload.name
    same_blocks = [b.name for b in plan.blocks] == [b.name for b in model.workload.blocks]
    other_steps = same_name and plan.steps != model.pipe.config.steps
    # compared at the plan's steps: at the config's, a plan of --steps 8 with a block edited out was said to
    # differ in its fingerprint too, which was the 4-step model's
    config, workload = _at_steps(model, plan.steps, plan_path) if other_steps else (None, model.workload)
    if same_blocks and same_name:
        # the same model's blocks: a mismatch is its steps edited in the file, even to the model's own steps (a
        # plan of --steps 8 edited to 4 got the generic "make a new plan"), or its fingerprint (said to be steps)
        made_at = None if plan.workload_fingerprint == workload.fingerprint() else _steps_of(
            model, plan.workload_fingerprint)
        if made_at is not None and made_at != plan.steps:
            fix = (f"make the plan with `residency plan {name} --steps {plan.steps} -o …` (steps edited in the "
                   f"file from {made_at} leave its workload_fingerprint at the old count)")
        else:
            fix = (f"make the plan again: `residency plan {name}{f' --steps {plan.steps}' if other_steps else ''} "
                   "-o …` (its workload_fingerprint is this model's at no step count: edited, or written by "
                   "another version of residency)")
    else:  # another model, or this one's plan with blocks edited: made again, at its steps
        fix = (f"make a plan for this model: `residency plan {name}"
               f"{f' --steps {plan.steps}' if other_steps else ''} -o plan.json`, then --plan plan.json")
    _check_plan_file(plan, workload, model.label, plan_path, fix)
    plan = named_as_checked(plan, workload.name, plan_path)
    if not other_steps:
        return model, plan
    model.pipe.config = config  # once the plan is known to fit: only a session reads it, when it starts
    return dataclasses.replace(model, workload=workload), plan


def check_one_compute_dtype(plan: Plan, source: str, model: str) -> None:
    """Refuse, before anything is predicted, a plan file whose blocks compute in different dtypes: `run`, `play` and
    `demo` cast the whole model to one (its first block's), so an edited block failed after the plan was stated,
    with a hint for library users. `source`: the plan's file, for the message; `model`: the name the command was
    given, for the hint."""
    first = plan.blocks[0].compute_dtype if plan.blocks else None
    for i, bp in enumerate(plan.blocks):
        if bp.compute_dtype != first:
            raise ResidencyError(
                f"{source}: blocks[{i}].compute_dtype for block {bp.name} is {bp.compute_dtype}, and "
                f"blocks[0].compute_dtype ({plan.blocks[0].name}) is {first}: the command casts the whole model to one "
                "dtype",
                hint=f"give every block the same compute_dtype (fp32, bf16 or fp16), or make the plan again with "
                     f"`residency plan {model} --compute-dtype {first} -o {source}`")


def _at_steps(model: Model, steps: int, source: str) -> tuple[Any, Workload]:
    """The pipeline config of `model` with its sampler at `steps` denoise steps per latent frame, and the workload
    of that config; the model itself is left as it is.

    Raises ResidencyError naming `source` for a count the world model's sampler does not take."""
    from pipelines.world_model.workload import catalog_entry
    from residency.workload import workload_from_dict

    try:
        config = dataclasses.replace(model.pipe.config, steps=steps)
    except ResidencyError as e:
        raise ResidencyError(f"{source}: steps is {steps}, which {model.label} cannot run ({e.message})",
                             hint="make the plan with `residency plan … --steps N` for a count the model takes") from e
    return config, workload_from_dict(catalog_entry(config))


def _steps_of(model: Model, fingerprint: str) -> int | None:
    """The denoise steps at which `model`'s workload has `fingerprint`, or None. Cost: a workload per count the
    sampler takes (milliseconds each), on an error path only."""
    from residency.workload.spec import MAX_STEPS

    for steps in range(1, MAX_STEPS + 1):
        try:
            if _at_steps(model, steps, "")[1].fingerprint() == fingerprint:
                return steps
        except ResidencyError:
            continue
    return None


def named_as_checked(plan: Plan, name: str, plan_path: str) -> Plan:
    """`plan` under the name of the model it was checked against (`name`, whose blocks and workload_fingerprint
    it has): a `model` field edited to another model's headed the output with that model, predicted for this one."""
    if plan.model == name:
        return plan
    print(f"note: {plan_path}: its model field says {plan.model!r}, but its blocks and workload_fingerprint are "
          f"those of {name!r}: shown as {name!r}", file=sys.stderr)
    return dataclasses.replace(plan, model=name)


def _check_plan_file(plan: Plan, workload, label: str, plan_path: str, fix: str) -> None:
    """Plan.check_matches for a plan file, its errors naming the file; and its context_frames (check_context)."""
    try:
        plan.check_matches(workload, f"model {label}", fix=fix)
    except ResidencyError as e:
        raise ResidencyError(f"{plan_path}: {e.message}", hint=e.hint) from None
    check_context(plan, workload, label, plan_path)


def check_context(plan: Plan, workload, label: str, plan_path: str) -> None:
    """A plan file's context_frames, which the runtime never reads (the model's own are what it keeps), and no
    fingerprint covers: edited to 1024, a plan ran and said it held within a budget its KV cache alone would
    overrun; edited to 0, `plan --plan` predicted it as unedited."""
    if plan.context_frames != workload.context_frames:
        name = label.split(" ", 1)[0]
        said = (f"context_frames is {plan.context_frames}" if plan.context_frames else
                "context_frames is 0 (or left out)")
        raise ResidencyError(f"{plan_path}: {said}, but model {label} keeps {workload.context_frames} past latent "
                             f"frames in its KV cache (the plan was made for {workload.context_frames}: edited since?)",
                             hint=f"put it back to {workload.context_frames}, or make the plan again: "
                                  f"`residency plan {name} --steps {plan.steps} -o {plan_path}`")


def predicted_here(model, plan, device, path: str, console):
    """A loaded plan with the prediction made here for its profile (one simulation), said where the file held none
    (left out, or dropped as the plan was edited since written) or another: a file without its digest, or with only
    its prediction edited, kept figures that were not this plan's ("+63 %" against a prediction of the plan before
    its blocks were edited, and advice to calibrate)."""
    from dataclasses import replace

    from residency.simulate import predict

    if plan.profile_backend and plan.profile_backend != device.backend:  # an edit the digest does not cover
        console.print(f"note: {path} says its profile's backend is {plan.profile_backend!r}; the profile it names "
                      f"({plan.profile}) is {device.backend!r}, as read here", markup=False, highlight=False)
        plan = replace(plan, profile_backend=device.backend)
    fresh = predict(model.workload, plan, device, model.sensitivity, bound=False)
    said = plan.prediction
    if said is None:
        console.print(f"note: {path} holds no prediction of the plan as it is (left out, or the plan was edited "
                      f"since `residency plan` wrote it): predicted here for {plan.profile}", markup=False,
                      highlight=False)
    elif (abs(said.frame_ms - fresh.prediction.frame_ms) > 1e-3 * fresh.prediction.frame_ms
          or said.peak_total_bytes != fresh.prediction.peak_total_bytes):
        console.print(f"note: the prediction in {path} ({said.frame_ms:.2f} ms per latent frame, "
                      f"{fmt_bytes(said.peak_total_bytes)}) is not this plan's as it is (edited, or written by another "
                      f"version of residency): predicted here for {plan.profile}: {fresh.prediction.frame_ms:.2f} ms, "
                      f"{fmt_bytes(fresh.prediction.peak_total_bytes)}", markup=False, highlight=False)
    else:
        return plan  # the file's own figures (its lower bound too)
    return fresh
