"""The search of our planner: MILP proposals over KV dtypes × prefetch depths, verified by the simulator.

For each (KV dtype, depth) the fastest plan is solved for, then the linear model's frame budget is
bisected for the best quality the simulator confirms. Without a frame budget the frame time ranked by is derived
from the fastest plan that fits (ranking.default_frame_ms). At the quality finally chosen the time is solved for
once more, with the ring's stalls charged (fastest_at_quality, policies.ours.stalls). Cost: up to 1 + 2·REPAIRS solves
and simulations per (KV dtype, depth) (a bisection step whose plan stalls past the budget is solved once more under its
own peak memory), then one more, each solve capped by a node count
(PlanOptions.milp_node_limit), plus up to MEMORY_REPAIRS more per solve the simulator finds over the VRAM budget:
bounded by work, not wall time, so the same request gives the same plan under any machine load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from policies.base import PlanRequest, fits_memory
from policies.ours.milp import Problem, Solution, solve
from policies.ours.options import BlockClass, block_classes
from policies.ours.parallel import Deferred, Tasks, planning_threads
from policies.ours.problem import problem_for, to_plan
from policies.ours.ranking import better, default_frame_ms
from policies.ours.stalls import charged, class_penalties_s, stall_by_block_s, worth_resolving
from residency.plan import Execution, Plan
from residency.simulate.quality import kv_loss

DEPTHS = (1, 2)  # prefetch depths tried; deeper rarely pays for its slot memory on a world model
NO_RING = 0  # the depth tried where nothing fits at DEPTHS: no prefetch, one slot
DEEPER_IF_STALL = 0.02  # try the deeper ring only when the best plan stalls > 2% of its frame
REPAIRS = 5  # bisection steps on the linear frame budget when the simulator disagrees
# Re-solves of one proposal the simulator finds over the VRAM budget, each with the MILP's VRAM limit tightened
# by twice the overshoot. The MILP counts the simulator's memory kinds, but within the solver's tolerance (memory
# is in units of the model's bytes: ~1e-7 of them, 0.1 B on a 1 MB model, 1-2 KB on a 20 GB one) and only those
# it models: a proposal a little over would otherwise be dropped, and with it every plan
# near the budget — on a tiny model, all the resident quantized ones, leaving only plans that stream.
MEMORY_REPAIRS = 2
KV_FALLBACK = "fp8"


@dataclass(frozen=True)
class Found:
    """The planner's choice between its steps: the plan so far and what its notes must add."""

    best: Plan | None  # None: the MILP found no plan at any KV dtype and depth
    kv_dtype: str  # the KV dtype planned for: the request's, or the fallback when only it fits
    notes: tuple[str, ...] = ()  # why the choice differs from the plain search's, appended to the plan's own
    # The frame time plans are ranked by: the request's frame budget, or without one default_frame_ms of the
    # fastest plan that fits (None when none fits), which is `fastest`
    frame_ms: float | None = None
    fastest: Plan | None = None


def fits(plan: Plan | None) -> bool:
    """A plan that exists and fits its VRAM budget."""
    return plan is not None and fits_memory(plan)


def fastest_fitting(plans: Sequence[Plan | None]) -> Plan | None:
    """The fastest of the plans that fit (None when none does)."""
    fitting = [p for p in plans if fits(p)]
    return min(fitting, key=lambda p: p.prediction.frame_ms) if fitting else None


def may_fall_back(req: PlanRequest) -> bool:
    """May the planner store the KV cache in FP8 for this request: it pins no KV dtype, and the workload plans a cache
    in another dtype?"""
    return req.kv_dtype is None and req.workload.kv_dtype != KV_FALLBACK and req.workload.kv_cache_bytes() > 0


def search(req: PlanRequest, depths: tuple[int, ...] = DEPTHS) -> Found:
    """The best plan over KV dtypes (the workload's, then FP8 only when nothing fits) × prefetch depths. Where the
    workload's fits, FP8 may still win on quality or time: the caller weighs that (policies.ours.fallback_may_win)."""
    wanted = req.kv_dtype or req.workload.kv_dtype
    kv_choices = [wanted]
    if may_fall_back(req):
        kv_choices.append(KV_FALLBACK)  # halves the cache; searched here only when nothing fits without it
    best: Plan | None = None
    fastest = None
    for kv in kv_choices:
        best, fastest = _best_over_depths(req, kv, best, fastest, depths)
        if fits(best):
            break
    if not fits(best) and NO_RING not in depths:
        # no prefetch ring (each streamed call waits for its own copy into one slot): the ring's slots are what no
        # plan at depth 1 or 2 could fit (wan-causal-1.3b on the RTX 3060 at half its memory: nothing of ours fitted,
        # a peer's tensor-by-tensor streaming at 4790.8 ms was adopted, and ours without a ring fits at 4205.1 ms)
        for kv in kv_choices:
            best, fastest = _best_over_depths(req, kv, best, fastest, (NO_RING,))
            if fits(best):
                break
    frame_ms = ranked_frame_ms(req, fastest)
    if fits(best) and best.kv_dtype != wanted:
        note = f"KV cache stored as {best.kv_dtype} (e4m3): nothing fits with {wanted}"
        return Found(best, best.kv_dtype, (note,), frame_ms, fastest)
    return Found(best, wanted, (), frame_ms, fastest)


def fallback_may_win(req: PlanRequest, best: Plan) -> bool:
    """Could a plan with the KV cache in FP8 rank above `best`, a plan that fits at the workload's KV dtype? Where
    the request pins no KV dtype, and: there is no frame budget (a faster plan moves the allowance plans are ranked
    by, ranking.default_frame_ms), `best` misses the budget (the cache's reads halve), or `best` loses more quality
    than the FP8 cache alone would (kv_loss; halving the cache lends its memory to the weights). Else a search at
    FP8 (as long as the first) cannot change the plan."""
    if not may_fall_back(req) or not fits(best) or best.kv_dtype != req.workload.kv_dtype:  # at FP8: nothing else fit
        return False
    pred = best.prediction
    if req.budget.frame_ms is None or pred.frame_ms > req.budget.frame_ms:
        return True
    return pred.quality_loss > kv_loss(req.workload, KV_FALLBACK, req.sensitivity) * (1 + 1e-3)


def with_rivals_fastest(req: PlanRequest, found: Found, rivals: Sequence[Plan]) -> Found:
    """`found` ranking by the frame time derived from the fastest plan that fits among its own and `rivals`'
    (a change only without a frame budget, and where a rival's plan is faster than every one of ours)."""
    fastest = fastest_fitting([found.fastest, *rivals])
    return replace(found, frame_ms=ranked_frame_ms(req, fastest), fastest=fastest)


def ranked_frame_ms(req: PlanRequest, fastest: Plan | None) -> float | None:
    """The frame time to rank by: the request's budget, else (or where even the fastest fitting plan misses it)
    the allowance over the fastest fitting plan. Missing a budget of 1,000 ms by 21 s, a plan 1% faster at 33x
    the quality loss is no better (flux-schnell on the RTX 3060 at --fps 1 took it when speed alone ranked)."""
    allowance = default_frame_ms(fastest.prediction.frame_ms) if fastest is not None else None
    if req.budget.frame_ms is None:
        return allowance
    if allowance is None or fastest.prediction.frame_ms <= req.budget.frame_ms:
        return req.budget.frame_ms
    return allowance


def _best_over_depths(req: PlanRequest, kv_dtype: str, best: Plan | None, fastest: Plan | None,
                      depths: tuple[int, ...] = DEPTHS) -> tuple[Plan | None, Plan | None]:
    """The best plan and the fastest fitting one so far, after the depths at `kv_dtype`. Every candidate is
    kept until the end: the frame time ranked by without a frame budget moves as faster plans are found.
    Each depth's solves run as tasks (policies.ours.parallel): on two threads the depths' at once."""
    candidates = [best] if best is not None else []
    ranked_by = ranked_frame_ms(req, fastest)
    with Tasks(planning_threads()) as tasks:
        runs = _depth_runs(tasks, req, kv_dtype, fastest, depths)
        for depth, (start_task, bisect_task) in zip(depths, runs, strict=True):
            if depth > depths[0] and fits(best) and (
                    best.prediction.stall_ms <= DEEPER_IF_STALL * best.prediction.frame_ms):
                break  # a deeper ring costs slot memory and only pays where copies stall compute
            start = start_task.result()
            if start is None:
                continue
            fastest = fastest_fitting([fastest, start.plan])
            frame_ms = ranked_frame_ms(req, fastest)
            new = [start.plan, *bisect_task.result()]
            candidates += new
            if frame_ms != ranked_by:  # a faster plan moved the frame time ranked by: rank every candidate again
                best, new, ranked_by = None, candidates, frame_ms
            for candidate in new:
                if better(best, candidate, frame_ms):
                    best = candidate
    return best, fastest


@dataclass(frozen=True)
class _Start:
    """A depth's fastest plan, and what its bisection needs."""

    classes: list[BlockClass]
    base: Problem
    execution: Execution
    solution: Solution
    plan: Plan
    vram_bytes: int  # the VRAM limit the fastest plan was solved under


def _depth_runs(tasks: Tasks, req: PlanRequest, kv_dtype: str, fastest: Plan | None,
                depths: tuple[int, ...] = DEPTHS) -> list[tuple[Deferred, Deferred]]:
    """Per depth, the task of its fastest plan and the task of its bisection. A depth's bisection aims at the frame
    time ranked by once the fastest plans of it and the shallower depths are known (as the loop over depths finds
    it), so it waits for those tasks only; every fastest-plan task is submitted before any bisection."""
    starts = [tasks.submit(_depth_start, req, kv_dtype, depth) for depth in depths]

    def bisection(upto: int) -> list[Plan]:
        start = starts[upto].result()
        if start is None:
            return []
        known = [s.plan for s in (t.result() for t in starts[: upto + 1]) if s is not None]
        frame_ms = ranked_frame_ms(req, fastest_fitting([fastest, *known]))
        return _bisect(req, start.classes, replace(start.base, vram_bytes=start.vram_bytes),
                       (start.solution, start.plan, start.vram_bytes), start.execution, kv_dtype, frame_ms)

    return [(start, tasks.submit(bisection, i)) for i, start in enumerate(starts)]


def _depth_start(req: PlanRequest, kv_dtype: str, depth: int) -> _Start | None:
    """The fastest plan at prefetch depth `depth` (None when the MILP finds none)."""
    execution = Execution(prefetch_depth=depth)
    classes = block_classes(req.workload, req, execution, kv_dtype)
    base = problem_for(req, classes, execution, kv_dtype, vram_bytes=req.budget.vram_bytes, frame_s=None,
                       objective="time")
    got = _solve_fitting(req, classes, base, execution, kv_dtype)
    return None if got is None else _Start(classes, base, execution, got[0], got[1], got[2])


def _solve_fitting(req: PlanRequest, classes: list[BlockClass], problem: Problem, execution: Execution,
                   kv_dtype: str) -> tuple[Solution, Plan, int] | None:
    """The problem's solution, its plan, and the VRAM limit it was solved under: the problem's, or tighter
    where the simulator found the plan over the budget (MEMORY_REPAIRS). None when the MILP finds nothing."""
    vram = problem.vram_bytes
    found = None
    for _ in range(1 + MEMORY_REPAIRS):
        sol = solve(replace(problem, vram_bytes=vram))
        if sol is None:
            return found
        plan = to_plan(req, classes, sol, execution, kv_dtype)
        found = (sol, plan, vram)
        over = plan.prediction.peak_total_bytes - req.budget.vram_bytes
        if vram is None or over <= 0:
            break
        vram -= 2 * over
    return found


def fastest_at_quality(req: PlanRequest, best: Plan) -> Plan:
    """The fastest plan of `best`'s quality the MILP finds (`best` itself where it finds none that fits), which the
    caller weighs against `best`. The quality-first solves rank time only as a tie-break far below the solver's gap,
    and see no stalls: the time is solved for once more at best's loss (and depth and KV dtype), with the stalls the
    simulator found in best charged to the classes that caused them (policies.ours.stalls).
    Cost: one solve and its simulations, and one simulation with its timeline when best stalls."""
    execution, kv_dtype = best.execution, best.kv_dtype
    classes = block_classes(req.workload, req, execution, kv_dtype)
    if worth_resolving(best):
        classes = charged(classes, class_penalties_s(classes, best, stall_by_block_s(req, best)))
    # the MILP's loss is the weights' only: the KV cache's, the same for every plan at this dtype, comes off the cap
    kv_part = kv_loss(req.workload, kv_dtype, req.sensitivity)
    base = replace(problem_for(req, classes, execution, kv_dtype, vram_bytes=req.budget.vram_bytes, frame_s=None,
                               objective="time"), loss_cap=(best.prediction.quality_loss - kv_part) * (1 + 1e-6))
    got = _solve_fitting(req, classes, base, execution, kv_dtype)
    return got[1] if got is not None and fits(got[1]) and got[1].prediction.quality_loss <= (
        best.prediction.quality_loss * (1 + 1e-6)) else best


def _holds(plan: Plan, target_ms: float) -> bool:
    return plan.prediction.frame_ms <= target_ms * (1 + 1e-9) and fits_memory(plan)


def _bisect(req: PlanRequest, classes: list[BlockClass], base: Problem, start: tuple[Solution, Plan, int],
            execution: Execution, kv_dtype: str, target_ms: float | None) -> list[Plan]:
    """Plans of better quality than the fastest (`start`) at linear frame budgets up to the target."""
    fastest, first, _ = start
    if target_ms is None:  # nothing fits, so nothing to aim at: the fastest is the plan
        return []
    plans = []
    # Bisection on the linear model's frame budget: the simulator sees stalls the linear model does
    # not, so the largest linear budget whose plan the simulator confirms is searched for.
    lo, hi = fastest.frame_s, target_ms / 1e3
    linear_s = hi
    for _ in range(REPAIRS):
        got = _solve_fitting(req, classes, replace(base, objective="loss", frame_s=linear_s), execution, kv_dtype)
        if got is None:
            break
        candidate = got[1]
        plans.append(candidate)
        if fits_memory(candidate) and not _holds(candidate, target_ms) and worth_resolving(candidate):
            # missed on the ring's stalls, which the linear model does not see; the MILP breaks a tie in quality by
            # linear time, so at this budget it proposes the same stalling plan again. A plan of its quality that
            # needs less memory is another placement (often the one a smaller VRAM budget finds, and holds): asked
            # for once, under the candidate's own peak (bisecting alone lost quality as the budget grew)
            again = _solve_fitting(req, classes, replace(base, objective="loss", frame_s=linear_s,
                                                         vram_bytes=candidate.prediction.peak_total_bytes - 1),
                                   execution, kv_dtype)
            if again is not None:
                plans.append(again[1])
                if _holds(again[1], target_ms):
                    candidate = again[1]
        if _holds(candidate, target_ms):
            if linear_s >= target_ms / 1e3 * (1 - 1e-9):
                break  # confirmed at the full budget: nothing better to find
            lo = linear_s
        else:
            hi = linear_s
        linear_s = (lo + hi) / 2
    return plans


__all__ = ["DEPTHS", "KV_FALLBACK", "MEMORY_REPAIRS", "Found", "fastest_at_quality", "fastest_fitting", "fits",
           "may_fall_back", "ranked_frame_ms", "search", "with_rivals_fastest"]
