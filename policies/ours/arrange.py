"""Repair: which members of a block class take which of its placements.

The MILP chooses how many of a class's blocks stream, stay packed or stay resident; `problem.spread` deals those
out evenly over the class's members, starting at its first. Even spacing is right inside the frame, but where the
first streamed member falls against the frame's other work decides what its copy can hide under across the frame
boundary: lucid-800m at 1.5 GiB on the RX 7800 XT stalled 2.9 ms a frame as dealt (84.3 ms), 0.4 ms with the same
counts dealt six members later (82.3 ms). The simulator scores each rotation of the class's assignment; the best
that fits and ranks better is kept. Same counts, so the same bytes over the link and (members of one class being
alike) the same memory and quality; a class of unlike members is checked all the same. Cost: one prediction per
rotation tried (~2-10 ms each), at most MAX_SHIFTS per class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from policies.base import PlanRequest, build_plan, fits_memory
from residency.plan import BlockPlan, Plan

MAX_SHIFTS = 24  # rotations tried per class (a count, so the result does not depend on the machine's load)


def _role(bp: BlockPlan) -> tuple:
    """What the MILP decided for a block, apart from which block it is."""
    return bp.placement, bp.format, bp.lifetime, bp.dequant_on, bp.exec_mode, bp.compute_dtype


def _given(role_of: BlockPlan, block: BlockPlan) -> BlockPlan:
    """`block` with the decision `role_of` carries."""
    return replace(role_of, name=block.name, modules=block.modules, tensors=block.tensors)


def rotated(plan: Plan, members: list[int], shift: int) -> list[BlockPlan]:
    """The plan's blocks with the decisions of `members` (indices into plan.blocks, in workload order) moved
    `shift` members later, the last ones wrapping to the first."""
    blocks = list(plan.blocks)
    roles = [plan.blocks[i] for i in members]
    for i, role in zip(members, roles[-shift:] + roles[:-shift], strict=True):
        blocks[i] = _given(role, plan.blocks[i])
    return blocks


def arrange(req: PlanRequest, plan: Plan, better: Callable[[Plan, Plan], bool]) -> tuple[Plan, list[str]]:
    """The best of `plan` and the rotations of each class's decisions (class by class, each from the best so far),
    and the classes moved with their shift."""
    if not fits_memory(plan):
        return plan, []
    w = req.workload
    classes: dict[str, list[int]] = {}
    for i, bp in enumerate(plan.blocks):
        if w.calls_per_frame(bp.name):  # a phase block's place in its class changes no frame's overlap
            classes.setdefault(w.by_name[bp.name].block_class, []).append(i)
    best, moved = plan, []
    for name, members in classes.items():
        if len({_role(plan.blocks[i]) for i in members}) < 2:
            continue
        start, chosen = best, 0
        for shift in range(1, min(len(members), MAX_SHIFTS + 1)):
            candidate = build_plan(req, plan.policy, rotated(start, members, shift), plan.execution,
                                   notes=plan.notes, kv_dtype=plan.kv_dtype)
            if fits_memory(candidate) and better(best, candidate):
                best, chosen = candidate, shift
        if chosen:
            moved.append(f"{name} ({chosen} members later)")
    return best, moved
