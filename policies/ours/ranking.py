"""Which of two plans our planner prefers: fitting, then holding the frame budget, then quality or speed.

The one order used by the search, the adoption of a rival's plan and the pinning repair.
"""

from __future__ import annotations

from policies.base import fits_memory
from residency.plan import Plan

QUALITY_SLACK = 1.10  # without a frame budget: the best quality within 10% of the fastest plan


def _lt(x: float, y: float) -> bool:
    """x clearly below y: ties within 0.1% are not a reason to switch plans."""
    return x < y * (1 - 1e-3) - 1e-12


def _quality_first(a: Plan, b: Plan) -> bool:
    pa, pb = a.prediction, b.prediction
    return _lt(pb.quality_loss, pa.quality_loss) or (
        not _lt(pa.quality_loss, pb.quality_loss) and _lt(pb.frame_ms, pa.frame_ms))


def better(a: Plan | None, b: Plan, frame_ms: float | None) -> bool:
    """Is b better than a: fitting beats not fitting; then holding the frame budget; then quality within
    the budget (speed when it cannot be held, or when there is none and the two are not equally fast)."""
    if a is None:
        return True
    pa, pb = a.prediction, b.prediction
    if fits_memory(a) != fits_memory(b):
        return fits_memory(b)
    if frame_ms is None:
        if max(pa.frame_ms, pb.frame_ms) <= min(pa.frame_ms, pb.frame_ms) * QUALITY_SLACK:
            return _quality_first(a, b)
        return _lt(pb.frame_ms, pa.frame_ms)
    holds_a, holds_b = pa.frame_ms <= frame_ms, pb.frame_ms <= frame_ms
    if holds_a != holds_b:
        return holds_b
    if holds_b:
        return _quality_first(a, b)
    return _lt(pb.frame_ms, pa.frame_ms)


__all__ = ["QUALITY_SLACK", "better"]
