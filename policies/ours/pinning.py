"""Repair: keep the smallest streamed blocks on the device when the ring stalls behind them.

The MILP prices a streamed block as max(copy, compute) of its own, but a ring of depth d prefetches d
calls ahead, not d bytes ahead: a run of small streamed blocks (VAE layers, embeddings) before a large
one leaves the large one's copy only the small blocks' compute to hide under, and compute stalls. The
simulator sees it; this move tries the cure it suggests. Blocks at or under a size threshold leave the
ring (same format: resident unpacked when that fits, else resident-quantized), for each threshold
from the smallest streamed block up; the simulator scores every variant, the best is kept. Cost: one
simulation per distinct streamed size, two where the unpacked variant does not fit (~5-10 ms each for catalog
models; Flux: 17 sizes), at most MAX_THRESHOLDS sizes: a count, so the result does not depend on load.
"""

from __future__ import annotations

from collections.abc import Callable

from policies.base import PlanRequest, build_plan, fits_memory, weights_format
from residency.plan import BlockPlan, Plan

MAX_THRESHOLDS = 64  # size thresholds tried, smallest first (~0.5 s of simulations at the most)


def _pinned(bp: BlockPlan, packed: bool) -> BlockPlan:
    """The block kept on the device in its plan's format: unpacked once at load, or packed and dequantized
    per call (`packed`; a block already in its compute dtype's format is the same either way)."""
    placement = "resident-quantized" if packed and bp.format != weights_format(bp.compute_dtype) else "resident"
    return BlockPlan(bp.name, placement, bp.format, bp.compute_dtype, "session", "compute", exec_mode=bp.exec_mode)


def pin_small_streamed(req: PlanRequest, plan: Plan, better: Callable[[Plan, Plan], bool]) -> Plan:
    """The best of `plan` and its variants with the streamed blocks ≤ each size threshold kept resident;
    thresholds are tried smallest first (MAX_THRESHOLDS at most) until one does not fit."""
    w = req.workload
    frame_streamed = [bp for bp in plan.blocks if bp.placement == "streamed" and w.calls_per_frame(bp.name)]
    if len(frame_streamed) < 2 or not fits_memory(plan):
        return plan
    size = {bp.name: w.by_name[bp.name].nbytes(bp.format) for bp in frame_streamed}
    best = plan
    for threshold in sorted(set(size.values()))[:-1][:MAX_THRESHOLDS]:  # the largest blocks stay streamed
        pinned = {name for name, n in size.items() if n <= threshold}
        # packed differs from unpacked only for blocks not stored in their compute dtype's format
        packed_differs = any(bp.format != weights_format(bp.compute_dtype) for bp in plan.blocks if bp.name in pinned)
        chosen = None
        for packed in (False, True) if packed_differs else (False,):
            blocks = [_pinned(bp, packed) if bp.name in pinned else bp for bp in plan.blocks]
            candidate = build_plan(req, plan.policy, blocks, plan.execution, notes=plan.notes, kv_dtype=plan.kv_dtype)
            if fits_memory(candidate):
                chosen = candidate
                break
        if chosen is None:
            break  # a larger threshold pins more bytes: it cannot fit either
        if better(best, chosen):
            best = chosen
    return best
