"""policies.ours.ranking.better between plans that miss the frame budget: a faster plan wins only when it is
clearly faster; within the quality slack of each other, quality decides (as it does without a budget)."""

from __future__ import annotations

from policies.ours.ranking import QUALITY_SLACK, better
from residency.plan import Budget, Plan, Prediction


def plan(frame_ms: float, loss: float) -> Plan:
    prediction = Prediction(frame_ms=frame_ms, first_frame_ms=frame_ms, stall_ms=0.0, copy_ms=0.0,
                            compute_ms=frame_ms, link_bytes_per_frame=0, peak_bytes={"slots": 1},
                            lower_bound_ms=frame_ms, quality_loss=loss)
    return Plan(model="m", workload_fingerprint="-", profile="p", profile_fingerprint="-", policy="ours",
                budget=Budget(2**30, frame_ms=1000.0), blocks=(), steps=1, context_frames=0, prediction=prediction)


def test_missing_the_budget_a_slightly_faster_plan_at_far_worse_quality_does_not_win():
    good, fast_bad = plan(21272.0, 0.197), plan(21046.0, 6.469)  # flux-schnell, RTX 3060, --fps 1
    assert not better(good, fast_bad, 1000.0) and better(fast_bad, good, 1000.0)


def test_missing_the_budget_a_plan_clearly_faster_wins_whatever_its_quality():
    slow = plan(2000.0, 0.1)
    fast = plan(2000.0 / QUALITY_SLACK / 1.05, 0.9)
    assert better(slow, fast, 1000.0) and not better(fast, slow, 1000.0)


def test_holding_the_budget_still_comes_before_quality():
    holds, misses = plan(900.0, 0.9), plan(1100.0, 0.1)
    assert better(misses, holds, 1000.0) and not better(holds, misses, 1000.0)
