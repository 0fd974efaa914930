"""Which of two plans our planner prefers: fitting, then holding the frame budget, then quality or speed.

The one order used by the search, the adoption of a rival's plan and the pinning repair.
"""

from __future__ import annotations

from policies.base import fits_memory
from residency.plan import Plan

# Without a frame budget the user has no fps target, but still wants neither the fastest plan at any loss of
# quality nor a plan many times slower than one almost as good. So the best quality is sought within a time
# allowance of the fastest plan that fits — 10% or 1 ms per latent frame, whichever is more — and that allowance
# then ranks plans as a frame budget would (default_frame_ms). The 1 ms floor matters only where the fastest plan
# takes under 10 ms (a tiny model): there 10% is microseconds, and a plan 2x slower can still be imperceptibly fast
# and far better (the seed trade-off: T5 packed on the device instead of streamed at full precision).
QUALITY_SLACK = 1.10
MIN_SLACK_MS = 1.0


def default_frame_ms(fastest_ms: float) -> float:
    """The frame time a request without a frame budget is ranked by: the fastest fitting plan's, plus the
    allowance (QUALITY_SLACK, MIN_SLACK_MS) within which quality comes first."""
    return max(fastest_ms * QUALITY_SLACK, fastest_ms + MIN_SLACK_MS)


def _lt(x: float, y: float) -> bool:
    """x clearly below y: ties within 0.1% are not a reason to switch plans."""
    return x < y * (1 - 1e-3) - 1e-12


def _quality_first(a: Plan, b: Plan) -> bool:
    pa, pb = a.prediction, b.prediction
    return _lt(pb.quality_loss, pa.quality_loss) or (
        not _lt(pa.quality_loss, pb.quality_loss) and _lt(pb.frame_ms, pa.frame_ms))


def better(a: Plan | None, b: Plan, frame_ms: float | None) -> bool:
    """Is b better than a: fitting beats not fitting; then holding the frame budget; then quality within
    the budget (speed when it cannot be held, or when there is none and the two are not equally fast).

    The planner passes default_frame_ms(fastest) as `frame_ms` when the request has no frame budget; None is
    left for plans none of which fits, where there is no fastest fitting plan to derive it from."""
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


__all__ = ["MIN_SLACK_MS", "QUALITY_SLACK", "better", "default_frame_ms"]
