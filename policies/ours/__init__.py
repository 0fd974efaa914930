"""Our policy: the best quality that holds the VRAM and frame-time budgets, else the fastest that fits.

An exact MILP over block classes proposes; the simulator verifies and the loop repairs; the
simulator's number is the one reported. Rivals' plans are candidates too (the registered policy "ours"
gets the peers as its rivals, see `policies.registry`), so ours is never worse than one that fits — at ours'
execution modes, or at the rival's own where they compile nothing ours found not to repay its compile time over
the session (a peer is never followed into such a compile).
Without a frame budget: the best quality within an allowance of the fastest plan that fits
(policies.ours.ranking.default_frame_ms), the rule stated in the plan's notes.
Modes are chosen before placement (policies.ours.modes), so a graphed class's pool is charged to the budget
whatever the placement: where "auto+graphed" takes a graph, the plan is also made without graphs ("auto") and the
better by the ranking is returned — never worse than "auto" for the same request, at twice the planning.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

from policies.base import MODE_NOTE_PREFIX, PlanRequest, PolicyFn, fits_memory, is_device_miss
from policies.ours.arrange import arrange
from policies.ours.gap import gap_statement
from policies.ours.modes import ModeChoice, check_request_mode, choose_modes, mode_notes, with_modes
from policies.ours.options import CANDIDATE_FORMATS
from policies.ours.pinning import pin_small_streamed
from policies.ours.problem import least_memory_plan
from policies.ours.ranking import MIN_SLACK_MS, QUALITY_SLACK, better
from policies.ours.search import (
    DEPTHS,
    KV_FALLBACK,
    Found,
    fallback_may_win,
    fastest_at_quality,
    fastest_fitting,
    fits,
    may_fall_back,
    ranked_frame_ms,
    search,
    with_rivals_fastest,
)
from residency.formats.dtypes import weights_format
from residency.plan import Plan
from residency.simulate import lower_bound_s, predict
from residency.simulate.quality import kv_loss
from residency.units import fmt_ms


def plan(req: PlanRequest, rivals: Sequence[PolicyFn] = ()) -> Plan:
    """Search, adopt a rival's plan that scores better, repair the ring's stalls, then state the result."""
    started = time.perf_counter()  # for the timing note only: no step of the search looks at the clock
    check_request_mode(req)
    req = replace(req, options=replace(req.options, bound=False))  # candidates: no lower-bound LP each
    found, choices, chosen = _placed(req, rivals)
    declined = None
    if req.exec_mode.startswith("auto") and any(ch.mode == "graphed" for ch in choices.values()):
        # the pools were charged before placement: the same request without graphs may place better (a mode the
        # user forced, --exec-mode graphed, is kept)
        plain = replace(req, exec_mode="auto")
        alt_found, alt_choices, alt_chosen = _placed(plain, rivals)
        fastest = fastest_fitting([found.fastest, alt_found.fastest])
        frame_ms = ranked_frame_ms(req, fastest)
        if better(chosen, alt_chosen, frame_ms):
            p, q = chosen.prediction, alt_chosen.prediction
            declined = (f"graphs declined: the plan without them scored better ({fmt_ms(q.frame_ms)} ms at quality loss "
                        f"{q.quality_loss:.3g}, against {fmt_ms(p.frame_ms)} ms at {p.quality_loss:.3g} with their "
                        f"pools)")
            req, found, choices, chosen = plain, alt_found, alt_choices, alt_chosen
    # Candidates were scored without the lower bound (an LP each): compute it once, for the plan returned.
    bound_ms = lower_bound_s(req.workload, chosen, req.profile) * 1e3
    chosen = chosen.with_prediction(replace(chosen.prediction, lower_bound_ms=bound_ms))
    gap = gap_statement(req, chosen, chosen.kv_dtype)
    modes = mode_notes(choices, chosen.blocks, req.workload)
    default = _default_frame_note(req, found, chosen)
    unrated = _unrated_formats(req)
    notes = (*chosen.notes, *([default] if default else []), *modes, *([declined] if declined else []),
             *([gap] if gap else []), *([unrated] if unrated else []),
             f"planned in {time.perf_counter() - started:.2f} s")
    return replace(chosen, notes=notes)


def _unrated_formats(req: PlanRequest) -> str | None:
    """A note naming the candidate formats the profile has no dequant rate for: the search skips them (a
    hand-edited profile without Q8_0 planned without it, saying nothing), None when it has every one."""
    plain = weights_format(req.compute_dtype)
    missing = [f for f in CANDIDATE_FORMATS if f != plain and f not in req.profile.dequant_gweights_per_s]
    if not missing:
        return None
    return (f"not considered: {', '.join(missing)} (profile {req.profile.name!r} has no dequant rate for "
            f"{'it' if len(missing) == 1 else 'them'}; `residency profile` measures every format)")


def _placed(req: PlanRequest, rivals: Sequence[PolicyFn]) -> tuple[Found, dict[str, ModeChoice], Plan]:
    """The plan at the workload's KV dtype (_placed_at), or ours with the cache in FP8 where that ranks better: the
    two are weighed as made (placed, repaired), not as the searches first proposed them: weighed as proposed, tiny on
    the RTX 4060 Ti at 138 MiB and 5.4 ms (with its measured sensitivity table) took FP8 at loss 0.103 against BF16's
    0.130, and the repairs made those 0.038 and 0.028. The FP8 one is ours' own, no rival's: a peer stores its cache
    as the model does."""
    found, choices, chosen = _placed_at(req, rivals)
    if not fallback_may_win(req, chosen):
        return found, choices, chosen
    at_fp8 = replace(req, kv_dtype=KV_FALLBACK)
    # at the chosen plan's prefetch depth only: the depths' search is what a second search costs most of, and a
    # smaller cache rarely moves the depth that pays (a rival's adopted plan may have none of ours': all depths then)
    depth = chosen.execution.prefetch_depth
    alt_found, alt_choices, alt_chosen = _placed_at(at_fp8, (), (depth,) if depth in DEPTHS else DEPTHS)
    fastest = fastest_fitting([found.fastest, alt_found.fastest])
    frame_ms = ranked_frame_ms(req, fastest)
    if not fits_memory(alt_chosen) or not better(chosen, alt_chosen, frame_ms):
        return found, choices, chosen
    p, q = alt_chosen.prediction, chosen.prediction
    note = (f"KV cache stored as {KV_FALLBACK} (e4m3): {fmt_ms(p.frame_ms)} ms at quality loss {p.quality_loss:.3g} "
            f"(the cache's own {kv_loss(req.workload, KV_FALLBACK, req.sensitivity):.3g}), against "
            f"{fmt_ms(q.frame_ms)} ms at {q.quality_loss:.3g} with {chosen.kv_dtype}")
    alt_found = replace(alt_found, frame_ms=frame_ms, fastest=fastest)
    return alt_found, alt_choices, replace(alt_chosen, notes=(*alt_chosen.notes, note))


def _placed_at(req: PlanRequest, rivals: Sequence[PolicyFn],
               depths: tuple[int, ...] = DEPTHS) -> tuple[Found, dict[str, ModeChoice], Plan]:
    """The search (over the prefetch `depths`) at the request's modes, a rival's better plan adopted, the ring's
    stalls repaired: what it found, the modes chosen, and the plan under our name (no bound yet)."""
    found = search(req, depths)
    choices = choose_modes(req, found.kv_dtype)
    rival_plans = _rival_plans(req, rivals, choices)
    found = _adopt_better(with_rivals_fastest(req, found, rival_plans), rival_plans)
    found = _rivals_at_fallback_kv(req, rivals, found)
    found = _keep_small_streamed_resident(req, found)
    found = _fastest_of_its_quality(req, found)
    found = _arranged(req, found)
    return found, choices, _as_ours(req, found, rival_plans)



def _rivals_at_fallback_kv(req: PlanRequest, rivals: Sequence[PolicyFn], found: Found) -> Found:
    """Where nothing fits — ours at either KV dtype, nor a rival at the workload's — the rivals' plans with the KV
    cache at the fallback dtype, as ours' search tries it (a plan streaming tensor by tensor, which the MILP does not
    model, fits there: `plan default --vram 6.5MiB` said "does not fit: needs 6.77 MiB" where one of 6.45 MiB does)."""
    if fits(found.best) or not may_fall_back(req) or not rivals:
        return found
    at_fallback = replace(req, kv_dtype=KV_FALLBACK)
    choices = choose_modes(at_fallback, KV_FALLBACK)
    rival_plans = _rival_plans(at_fallback, rivals, choices)
    adopted = _adopt_better(with_rivals_fastest(at_fallback, found, rival_plans), rival_plans)
    if adopted.best is found.best:
        return found
    note = f"KV cache stored as {KV_FALLBACK} (e4m3): nothing fits with {req.workload.kv_dtype}"
    return replace(adopted, kv_dtype=KV_FALLBACK, notes=(*adopted.notes, note))


def _rival_plans(req: PlanRequest, rivals: Sequence[PolicyFn], choices: dict[str, ModeChoice]) -> list[Plan]:
    """Each rival's placement at ours' modes (a placement does not depend on the mode), and the rival's plan as it
    runs its own modes — unless it compiles a class ours found not to repay its compile time (a graph ours did not
    take costs no compile, so that plan stays a candidate). One rival call each."""
    declined = {c for c, ch in choices.items() if ch.mode != "compiled"}
    out = []
    for rival in rivals:
        own = rival(req)
        at_ours = _at_our_modes(req, own, choices)
        out.append(at_ours)
        compiled = {req.workload.by_name[bp.name].block_class for bp in own.blocks
                    if bp.exec_mode == "compiled" and bp.name in req.workload.by_name}
        # a mode the user forced (--exec-mode graphed) holds for a rival's placement too: adopted as the rival runs
        # it (eager), a plan of no graphs was returned, twice as slow as --exec-mode eager, with nothing said
        if at_ours is not own and not compiled & declined and req.exec_mode.startswith("auto"):
            out.append(own)
    return out


def _at_our_modes(req: PlanRequest, rival: Plan, choices: dict[str, ModeChoice]) -> Plan:
    """`rival` with each block at the mode ours chose for its class, re-predicted (one simulation) when that
    changes a block's mode; as it is otherwise."""
    blocks = tuple(with_modes(list(rival.blocks), choices, req.workload))
    if [b.exec_mode for b in blocks] == [b.exec_mode for b in rival.blocks]:
        return rival
    # the rival's note on its own modes, and its device-memory verdict (graph pools change it), no longer hold
    notes = tuple(n for n in rival.notes if not n.startswith(MODE_NOTE_PREFIX) and not is_device_miss(n))
    return predict(req.workload, replace(rival, blocks=blocks, notes=notes), req.profile, req.sensitivity,
                   bound=False)


def _adopt_better(found: Found, rivals: Sequence[Plan]) -> Found:
    """A rival's plan that fits and scores better than ours: ours could always have chosen its placement."""
    best, adopted = found.best, None
    for rival in rivals:
        if fits_memory(rival) and better(best, rival, found.frame_ms):
            best, adopted = rival, rival.policy
    if adopted is None:
        return found
    # the KV note, if any, described our own plan and is dropped with it
    return replace(found, best=best, notes=(f"the placement of the {adopted} policy scored best; adopted",))


def _keep_small_streamed_resident(req: PlanRequest, found: Found) -> Found:
    """The pinning repair (policies.ours.pinning), with a note on what it kept resident."""
    best = found.best
    if best is None:
        return found
    repaired = pin_small_streamed(req, best, lambda a, b: better(a, b, found.frame_ms))
    if repaired is best:
        return found
    if best.policy != "ours":  # an adopted rival's notes describe its placement ("every block streamed …"), no longer
        repaired = replace(repaired, notes=())  # this one; found's note names the rival
    kept = sum(a.placement == "streamed" and b.placement != "streamed"
               for a, b in zip(best.blocks, repaired.blocks, strict=True))
    before, after = best.prediction, repaired.prediction
    # the stall says why only where it fell: with none before, a block cheaper resident than streamed read "the ring
    # stalled behind them (0.0 → 0.0 ms stall per frame)"
    # a sync plan has no ring: its stall is its blocking loads, which keeping blocks resident removes by definition
    ring = best.execution.copy_mode != "sync" and after.stall_ms < before.stall_ms - 0.05
    why = "the prefetch ring stalled behind them" if ring else "each is faster resident than streamed"
    note = (f"{kept} small streamed block(s) kept resident instead: {why} ({before.frame_ms:.1f} → "
            f"{after.frame_ms:.1f} ms per {req.workload.frame_unit()}, {before.stall_ms:.1f} → {after.stall_ms:.1f} ms "
            "stall)")
    return replace(found, best=repaired, notes=(*found.notes, note))


def _fastest_of_its_quality(req: PlanRequest, found: Found) -> Found:
    """The search's plan (pinned), or a faster one of its quality (policies.ours.search.fastest_at_quality) given the
    same pinning repair; a rival's adopted plan is left as it is. One solve, and a pinning pass where it could win."""
    best = found.best
    if best is None or best.policy != "ours" or not fits_memory(best):
        return found
    faster = fastest_at_quality(req, best)
    # the pinning pass (a simulation per streamed size) only where it could make the difference: it removes at
    # most about the plan's stall, so a plan slower than best by more than that is dropped unpinned
    if faster.prediction.frame_ms - faster.prediction.stall_ms >= best.prediction.frame_ms * (1 - 1e-3):
        return found
    faster = pin_small_streamed(req, faster, lambda a, b: better(a, b, found.frame_ms))
    return replace(found, best=faster) if better(best, faster, found.frame_ms) else found


def _arranged(req: PlanRequest, found: Found) -> Found:
    """The arrangement repair (policies.ours.arrange): which members of a class stream, with a note when it moved any."""
    best = found.best
    if best is None:
        return found
    arranged, moved = arrange(req, best, lambda a, b: better(a, b, found.frame_ms))
    if arranged is best:
        return found
    before, after = best.prediction, arranged.prediction
    note = (f"placements re-dealt within {', '.join(moved)}: {before.frame_ms:.1f} → {after.frame_ms:.1f} ms "
            f"per {req.workload.frame_unit()}, {before.stall_ms:.1f} → {after.stall_ms:.1f} ms stall (the ring's copies "
            "hide under other compute)")
    return replace(found, best=arranged, notes=(*found.notes, note))


def _default_frame_note(req: PlanRequest, found: Found, chosen: Plan) -> str | None:
    """Without a frame budget: the rule that chose, and what the fastest plan would have given up."""
    fast = found.fastest
    if fast is None or not fits_memory(chosen):
        return None
    if chosen.prediction.frame_ms < fast.prediction.frame_ms:
        fast = chosen  # the pinning repair made it faster than the fastest the search had found
    budget = req.budget.frame_ms
    if budget is not None and fast.prediction.frame_ms <= budget:
        return None
    p, f = chosen.prediction, fast.prediction
    unit = req.workload.frame_unit()  # "image" for Flux: the plan's own lines say so, and "per frame" read odd
    head = "no frame budget" if budget is None else f"no plan holds {fmt_ms(budget)} ms per {unit}, so as without a budget"
    rule = (f"{head}: the best quality within {QUALITY_SLACK - 1:.0%} or {MIN_SLACK_MS:g} ms per {unit} "
            f"(whichever is more) of the fastest plan that fits ({fmt_ms(f.frame_ms)} ms at quality loss "
            f"{f.quality_loss:.3g})")
    if p.quality_loss >= f.quality_loss:
        return f"{rule}: that plan"
    return f"{rule}: {fmt_ms(p.frame_ms)} ms at quality loss {p.quality_loss:.3g}"


def _as_ours(req: PlanRequest, found: Found, rivals: Sequence[Plan] = ()) -> Plan:
    """The chosen plan under our name; when none fits, the one that needs the least memory, and how much."""
    best = found.best
    if best is None or not fits_memory(best):
        best = _least_memory(req, found, rivals)
    return replace(best, policy="ours", notes=(*best.notes, *found.notes))


def _least_memory(req: PlanRequest, found: Found, rivals: Sequence[Plan]) -> Plan:
    """Of the plans that do not fit, the one the simulator finds the smallest: the search's, the memory-objective
    solve at every KV dtype the request allows, and the rivals' — so that "needs X" is a budget some plan fits.
    The search's own plan was the best by quality and time at its KV dtype, not the smallest: tiny at --vram 7MiB
    showed a BF16 plan needing 10.1 MiB (6.3 of them dequant scratch) where 7.4 MiB fit a plan."""
    wanted = req.kv_dtype or req.workload.kv_dtype
    kv_dtypes = [wanted, KV_FALLBACK] if may_fall_back(req) else [wanted]
    candidates = [*([found.best] if found.best is not None else []), *rivals,
                  *(least_memory_plan(req, kv) for kv in kv_dtypes)]
    least = min(candidates, key=lambda p: p.prediction.peak_total_bytes)
    if least.kv_dtype == wanted:
        return least
    return replace(least, notes=(*least.notes, f"KV cache stored as {least.kv_dtype} (e4m3): the least memory"))


__all__ = ["plan"]
