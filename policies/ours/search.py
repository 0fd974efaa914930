"""The search of our planner: MILP proposals over KV dtypes × prefetch depths, verified by the simulator.

For each (KV dtype, depth) the fastest plan is solved for, then the linear model's frame budget is
bisected for the best quality the simulator confirms. Cost: up to 1 + REPAIRS solves and simulations per
(KV dtype, depth), each solve capped by a node count (PlanOptions.milp_node_limit): bounded by work, not
wall time, so the same request gives the same plan under any machine load.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from policies.base import PlanRequest, fits_memory
from policies.ours.milp import solve
from policies.ours.options import block_classes
from policies.ours.problem import problem_for, to_plan
from policies.ours.ranking import QUALITY_SLACK, better
from residency.plan import Execution, Plan

DEPTHS = (1, 2)  # prefetch depths tried; deeper rarely pays for its slot memory on a world model
DEEPER_IF_STALL = 0.02  # try the deeper ring only when the best plan stalls > 2% of its frame
REPAIRS = 5  # bisection steps on the linear frame budget when the simulator disagrees
KV_FALLBACK = "fp8"


@dataclass(frozen=True)
class Found:
    """The planner's choice between its steps: the plan so far and what its notes must add."""

    best: Plan | None  # None: the MILP found no plan at any KV dtype and depth
    kv_dtype: str  # the KV dtype planned for: the request's, or the fallback when only it fits
    notes: tuple[str, ...] = ()  # why the choice differs from the plain search's, appended to the plan's own


def _fits(plan: Plan | None) -> bool:
    return plan is not None and fits_memory(plan)


def search(req: PlanRequest) -> Found:
    """The best plan over KV dtypes (the workload's, then FP8 only when nothing fits) × prefetch depths."""
    wanted = req.kv_dtype or req.workload.kv_dtype
    kv_choices = [wanted]
    if req.kv_dtype is None and wanted != KV_FALLBACK and req.workload.kv_cache_bytes():
        kv_choices.append(KV_FALLBACK)  # halves the cache; taken only when nothing fits without it
    best: Plan | None = None
    for kv in kv_choices:
        best = _best_over_depths(req, kv, best)
        if _fits(best):
            break
    if _fits(best) and best.kv_dtype != wanted:
        note = f"KV cache stored as {best.kv_dtype} (e4m3): nothing fits with {wanted}"
        return Found(best, best.kv_dtype, (note,))
    return Found(best, wanted)


def _best_over_depths(req: PlanRequest, kv_dtype: str, best: Plan | None) -> Plan | None:
    for depth in DEPTHS:
        if depth > DEPTHS[0] and _fits(best) and (
                best.prediction.stall_ms <= DEEPER_IF_STALL * best.prediction.frame_ms):
            break  # a deeper ring costs slot memory and only pays where copies stall compute
        for candidate in _bisect(req, kv_dtype, depth):
            if better(best, candidate, req.budget.frame_ms):
                best = candidate
    return best


def _bisect(req: PlanRequest, kv_dtype: str, depth: int) -> list[Plan]:
    """The fastest plan, then plans of better quality at linear frame budgets up to the target."""
    execution = Execution(prefetch_depth=depth)
    classes = block_classes(req.workload, req, execution, kv_dtype)
    base = problem_for(req, classes, execution, kv_dtype, vram_bytes=req.budget.vram_bytes, frame_s=None,
                       objective="time")
    plans = []
    fastest = solve(base)
    if fastest is None:
        return plans
    plans.append(to_plan(req, classes, fastest, execution, kv_dtype))
    target_ms = req.budget.frame_ms
    if target_ms is None:
        # best quality within the slack of the fastest, measured by the simulator
        target_ms = plans[0].prediction.frame_ms * QUALITY_SLACK
    # Bisection on the linear model's frame budget: the simulator sees stalls the linear model does
    # not, so the largest linear budget whose plan the simulator confirms is searched for.
    lo, hi = fastest.frame_s, target_ms / 1e3
    linear_s = hi
    for _ in range(REPAIRS):
        sol = solve(replace(base, objective="loss", frame_s=linear_s))
        if sol is None:
            break
        candidate = to_plan(req, classes, sol, execution, kv_dtype)
        plans.append(candidate)
        if candidate.prediction.frame_ms <= target_ms * (1 + 1e-9) and fits_memory(candidate):
            if linear_s >= target_ms / 1e3 * (1 - 1e-9):
                break  # confirmed at the full budget: nothing better to find
            lo = linear_s
        else:
            hi = linear_s
        linear_s = (lo + hi) / 2
    return plans


__all__ = ["DEPTHS", "KV_FALLBACK", "Found", "search"]
