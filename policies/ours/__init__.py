"""Our policy: the best quality that holds the VRAM and frame-time budgets, else the fastest that fits.

An exact MILP over block classes proposes; the simulator verifies and the loop repairs; the
simulator's number is the one reported. Rivals' plans are candidates too (the registered policy "ours"
gets the peers as its rivals, see `policies.registry`), so ours is never worse than one that fits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

from policies.base import PlanRequest, PolicyFn, fits_memory
from policies.ours.gap import gap_statement
from policies.ours.modes import check_request_mode, choose_modes, mode_notes
from policies.ours.pinning import pin_small_streamed
from policies.ours.problem import least_memory_plan
from policies.ours.ranking import better
from policies.ours.search import Found, search
from residency.plan import Plan
from residency.simulate import lower_bound_s


def plan(req: PlanRequest, rivals: Sequence[PolicyFn] = ()) -> Plan:
    """Search, adopt a rival's plan that scores better, repair the ring's stalls, then state the result."""
    started = time.perf_counter()  # for the timing note only: no step of the search looks at the clock
    check_request_mode(req)
    req = replace(req, options=replace(req.options, bound=False))  # candidates: no lower-bound LP each
    found = search(req)
    found = _adopt_better(found, [rival(req) for rival in rivals], req.budget.frame_ms)
    found = _keep_small_streamed_resident(req, found)
    chosen = _as_ours(req, found)
    # Candidates were scored without the lower bound (an LP each): compute it once, for the plan returned.
    bound_ms = lower_bound_s(req.workload, chosen, req.profile) * 1e3
    chosen = chosen.with_prediction(replace(chosen.prediction, lower_bound_ms=bound_ms))
    gap = gap_statement(req, chosen, found.kv_dtype)
    modes = mode_notes(choose_modes(req, found.kv_dtype), chosen.blocks, req.workload)
    notes = (*chosen.notes, *modes, *([gap] if gap else []), f"planned in {time.perf_counter() - started:.2f} s")
    return replace(chosen, notes=notes)


def _adopt_better(found: Found, rivals: Sequence[Plan], frame_ms: float | None) -> Found:
    """A rival's plan that fits and scores better than ours: ours could always have chosen its placement."""
    best, adopted = found.best, None
    for rival in rivals:
        if fits_memory(rival) and better(best, rival, frame_ms):
            best, adopted = rival, rival.policy
    if adopted is None:
        return found
    # the KV note, if any, described our own plan and is dropped with it
    return Found(best, found.kv_dtype, (f"the placement of the {adopted} policy scored best; adopted",))


def _keep_small_streamed_resident(req: PlanRequest, found: Found) -> Found:
    """The pinning repair (policies.ours.pinning), with a note on what it kept resident."""
    best = found.best
    if best is None:
        return found
    repaired = pin_small_streamed(req, best, lambda a, b: better(a, b, req.budget.frame_ms))
    if repaired is best:
        return found
    kept = sum(a.placement == "streamed" and b.placement != "streamed"
               for a, b in zip(best.blocks, repaired.blocks, strict=True))
    note = (f"{kept} small streamed block(s) kept resident instead: the prefetch ring stalled behind them "
            f"({best.prediction.stall_ms:.1f} → {repaired.prediction.stall_ms:.1f} ms stall per frame)")
    return Found(repaired, found.kv_dtype, (*found.notes, note))


def _as_ours(req: PlanRequest, found: Found) -> Plan:
    """The chosen plan under our name; when none fits, the one that needs the least memory, and how much."""
    best = found.best if found.best is not None else least_memory_plan(req, found.kv_dtype)
    return replace(best, policy="ours", notes=(*best.notes, *found.notes))


__all__ = ["plan"]
