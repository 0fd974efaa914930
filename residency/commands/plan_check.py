"""`residency plan MODEL --plan FILE`: a plan file, hand-edited or not, predicted for MODEL instead of planned.

`run --plan` predicts a file before it runs it, but only the world models run: an edited plan of flux-schnell or of a
model directory could not be checked at all, short of attaching the model in Python. The file keeps its own budget,
steps, KV dtype and modes; the prediction is the simulator's at the profile given (default: this machine's).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from residency.errors import ResidencyError, UsageError

# flags that choose what a planner makes: a plan file has made those choices (its fields say them)
_CHOSEN = (("policy", "ours", "--policy", "policy"), ("exec_mode", "auto", "--exec-mode", "each block's exec_mode"),
           ("kv_dtype", None, "--kv-dtype", "kv_dtype"), ("fps", None, "--fps", "budget.frame_ms"),
           ("frame_ms", None, "--frame-ms", "budget.frame_ms"), ("vram", None, "--vram", "budget.vram_bytes"),
           ("steps", None, "--steps", "steps (and the workload_fingerprint made at them)"))


def refuse_planning_flags(args: argparse.Namespace) -> None:
    """UsageError for a flag that would change the plan file's own choices (it would be silently ignored)."""
    for attr, default, flag, field in _CHOSEN:
        if getattr(args, attr, default) != default:
            raise UsageError(f"{flag} with --plan: the plan file holds its own {field}",
                             hint=f"edit {field} in {args.plan}, or leave --plan out to plan anew with {flag}")


def predicted_plan_file(args: argparse.Namespace, make_request: Callable[[argparse.Namespace], Any]):
    """(request, the file's plan with the prediction made here) for `plan MODEL --plan FILE`; `make_request`: the
    plan command's (plan_cmd.make_request, passed in: plan_cmd imports this module). Raises ResidencyError naming
    the file for a plan of another model, of blocks computing in two dtypes, or not readable."""
    from residency.commands.loaded_plan import check_context, check_one_compute_dtype, named_as_checked
    from residency.plan import load_plan
    from residency.runtime.module_paths import check_block_formats
    from residency.simulate import predict

    refuse_planning_flags(args)
    plan = load_plan(args.plan)
    check_block_formats(plan, args.plan)  # as `run --plan` refuses it: a plan nothing can run is not one that fits
    check_one_compute_dtype(plan, args.plan, args.model)
    if args.compute_dtype is not None and plan.blocks and args.compute_dtype != plan.blocks[0].compute_dtype:
        raise UsageError(f"--compute-dtype {args.compute_dtype} with --plan: the plan file's blocks compute in "
                         f"{plan.blocks[0].compute_dtype}", hint=f"leave --compute-dtype out, or edit the blocks' "
                                                                 f"compute_dtype in {args.plan}")
    # the workload at the file's steps and compute dtype: its fingerprint then matches an unedited plan's
    args = argparse.Namespace(**{**vars(args), "compute_dtype": plan.blocks[0].compute_dtype if plan.blocks else None,
                                 "steps": plan.steps})
    req = make_request(args)
    try:
        # not `-o` the file itself: it is the input this command checks (a hand-edited plan would be lost)
        plan.check_matches(req.workload, f"model {args.model}",
                           fix=f"check that {args.plan} is a plan of {args.model} (its model and workload_fingerprint "
                               f"say which it is for); a new one: residency plan {args.model} -o another.json")
    except ResidencyError as e:
        raise ResidencyError(f"{args.plan}: {e.message}", hint=e.hint) from None
    check_context(plan, req.workload, args.model, args.plan)
    plan = named_as_checked(plan, req.workload.name, args.plan)
    # the file's notes told how its planner chose (and may no longer hold for an edited plan): this one says what it is
    fingerprint = req.profile.fingerprint()
    made_for = "" if plan.profile_fingerprint == fingerprint else f"; it was made for {plan.profile}"
    # the profile fields follow the prediction: written with -o, a file naming one profile and holding another's
    # figures was then said by `run --plan` to be "edited, or written by another version"
    plan = dataclasses.replace(plan, notes=(f"the plan in {args.plan}, predicted here for {req.profile.name}"
                                            f"{made_for}",), profile=req.profile.name,
                               profile_fingerprint=fingerprint, profile_backend=req.profile.backend)
    return req, predict(req.workload, plan, req.profile, req.sensitivity)
