"""Stall-aware re-solves: the ring's stalls the simulator sees, charged back to the block classes that caused them.

The MILP prices a streamed block's copy as if it could hide under any compute of the frame, but a ring of depth d
prefetches only d calls ahead: a run of streamed blocks whose copies outlast their neighbours' compute (a text
encoder's large, cheap layers; three streamed DiT blocks in a row) leaves compute idle. The simulator's steady frame
says where: each idle gap lies before the streamed call whose copy it waited for. Its class's streamed options are
charged that stall per streamed member, on both engines (compute waited; where the frame is copy-bound, the copy engine
sat with its slots full), and the MILP solved again, so it can keep those blocks resident and stream others whose
copies do hide. Cost: one simulation (with its timeline) per re-solve.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from policies.base import PlanRequest
from policies.ours.options import BlockClass
from residency.plan import Plan
from residency.simulate import simulate

# Stall worth a re-solve, as a share of the frame: below it the linear model is as good as the simulator.
MIN_STALL_SHARE = 0.01


def worth_resolving(plan: Plan) -> bool:
    """Does the plan stall enough for a stall-aware re-solve?"""
    p = plan.prediction
    return p.stall_ms > MIN_STALL_SHARE * p.frame_ms


def stall_by_block_s(req: PlanRequest, plan: Plan) -> dict[str, float]:
    """Seconds compute sat idle before each block's calls in the simulator's steady frame (blocks with none
    absent): the gap before a streamed call is the wait for its copy."""
    sim = simulate(req.workload, plan, req.profile, req.sensitivity, bound=False)
    calls = sorted((e for e in sim.events if e.track in ("compute", "dequant")), key=lambda e: (e.start_ms, e.end_ms))
    out: dict[str, float] = {}
    busy_until_ms = None
    for e in calls:
        if e.frame == sim.steady_frame and busy_until_ms is not None and e.start_ms > busy_until_ms:
            out[e.label] = out.get(e.label, 0.0) + (e.start_ms - busy_until_ms) / 1e3
        busy_until_ms = e.end_ms if busy_until_ms is None else max(busy_until_ms, e.end_ms)
    return out


def class_penalties_s(classes: list[BlockClass], plan: Plan, stalls_s: Mapping[str, float]) -> dict[int, float]:
    """Per class index: the stall per frame of each of its streamed members (the class's stall ÷ its streamed
    count); classes that did not stall are absent."""
    out = {}
    for ci, c in enumerate(classes):
        streamed = [n for n in c.blocks if plan.by_name[n].placement == "streamed"]
        stall = sum(stalls_s.get(n, 0.0) for n in streamed)
        if stall > 0:
            out[ci] = stall / len(streamed)
    return out


def charged(classes: list[BlockClass], penalties_s: Mapping[int, float]) -> list[BlockClass]:
    """`classes` with each penalised class's streamed options costing its penalty more compute and copy per frame."""
    out = []
    for ci, c in enumerate(classes):
        extra = penalties_s.get(ci, 0.0)
        if not extra:
            out.append(c)
            continue
        options = tuple(replace(o, compute_s=o.compute_s + extra, copy_s=o.copy_s + extra)
                        if o.placement == "streamed" else o for o in c.options)
        out.append(replace(c, options=options))
    return out


__all__ = ["charged", "class_penalties_s", "stall_by_block_s", "worth_resolving"]
