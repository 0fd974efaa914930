"""A frame budget no plan holds: plans are ranked as without one (the best quality within the allowance over the
fastest fitting plan), not by speed alone, and the choice does not depend on the order candidates come in."""

from __future__ import annotations

from functools import reduce

from policies import PlanRequest
from policies.ours.ranking import better, default_frame_ms
from policies.ours.search import fastest_fitting, ranked_frame_ms
from residency.plan import Budget, Plan, Prediction


def plan(frame_ms: float, loss: float) -> Plan:
    prediction = Prediction(frame_ms=frame_ms, first_frame_ms=frame_ms, stall_ms=0.0, copy_ms=0.0,
                            compute_ms=frame_ms, link_bytes_per_frame=0, peak_bytes={"slots": 1},
                            lower_bound_ms=frame_ms, quality_loss=loss)
    return Plan(model="m", workload_fingerprint="-", profile="p", profile_fingerprint="-", policy="ours",
                budget=Budget(2**30, frame_ms=1000.0), blocks=(), steps=1, context_frames=0, prediction=prediction)


def request(frame_ms: float | None) -> PlanRequest:
    return PlanRequest(workload=None, profile=None, budget=Budget(2**30, frame_ms=frame_ms))


def test_a_budget_even_the_fastest_plan_misses_ranks_by_the_allowance_over_it():
    fast = plan(21046.0, 6.469)  # flux-schnell, RTX 3060, --fps 1
    assert ranked_frame_ms(request(1000.0), fast) == default_frame_ms(21046.0)
    assert ranked_frame_ms(request(30000.0), fast) == 30000.0  # held: the budget itself
    assert ranked_frame_ms(request(None), fast) == default_frame_ms(21046.0)
    good = plan(21272.0, 0.197)
    frame_ms = ranked_frame_ms(request(1000.0), fast)
    assert better(fast, good, frame_ms) and not better(good, fast, frame_ms)


def test_the_choice_does_not_drift_with_the_order_of_the_candidates():
    # each 9% slower and better than the one before: pairwise "within 10%" would walk to the slowest
    chain = [plan(1000.0 * 1.09 ** i, 1.0 / (i + 1)) for i in range(10)]
    frame_ms = ranked_frame_ms(request(500.0), fastest_fitting(chain))
    picks = {reduce(lambda a, b: b if better(a, b, frame_ms) else a, order).prediction.frame_ms
             for order in (chain, chain[::-1])}
    assert len(picks) == 1 and picks.pop() <= default_frame_ms(1000.0)
