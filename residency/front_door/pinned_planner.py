"""A planner for models some of whose blocks must stay bound for the whole call: those enclosing the others (a
pipeline component's or a plain module's root parameters and buffers) and those whose tensors the model reads
outside their calls (a tied head as F.linear(x, self.emb.weight)). The policy's plan with those blocks made
resident for the session, re-scored, and planned again within what they leave when pinning them broke the
budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from residency.device import DeviceProfile
from residency.front_door.vram import COMPUTE_FORMAT
from residency.plan import Budget, Plan
from residency.units import first_names, fmt_bytes
from residency.workload import Workload
from residency.workload.pipeline_phases import enclosing_blocks

# Plans tried per request: each retry asks the policy for the bytes pinning added less (a block the policy
# streamed, made resident, costs more than its slot share); the first that fits is kept.
PIN_ATTEMPTS = 3


OUTSIDE_READS = "the model reads its tensors outside its calls"  # bound_blocks' reason for such a block


def bound_blocks(workload: Workload) -> dict[str, str]:
    """Blocks the runtime must keep bound for the whole call (name -> why): enclosing others (it cannot hook
    them: residency.runtime.module_paths) or read outside their own calls (BlockSpec.read_outside_calls)."""
    out = {n: "the runtime reads them all through the call" for n in enclosing_blocks(workload)}
    for b in workload.blocks:
        if b.read_outside_calls and b.name not in out:
            out[b.name] = OUTSIDE_READS
    return out


def unpinned_enclosing(plan: Plan, workload: Workload, bound: Mapping[str, str] | None = None) -> dict[str, str]:
    """Blocks that must stay bound (bound_blocks, or `bound` computed already) that the plan does not keep
    resident for the session (name -> what the plan made them)."""
    return {n: f"{plan.by_name[n].placement}/{plan.by_name[n].lifetime}"
            for n in (bound if bound is not None else bound_blocks(workload))
            if (plan.by_name[n].placement, plan.by_name[n].lifetime) != ("resident", "session")}


def grouped_reasons(why: Mapping[str, str]) -> str:
    """"a, b: reason; c: other reason": the blocks of `why` (name -> reason) grouped by their reason, so that none
    is given another's (one reason said for all read "the runtime reads them all through the call" of a block the
    model reads outside its calls)."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in why.items():
        by_reason.setdefault(reason, []).append(name)
    if len(by_reason) == 1:
        return next(iter(by_reason))
    return "; ".join(f"{first_names(names)}: {reason}" for reason, names in by_reason.items())


def _kept_note(why: Mapping[str, str]) -> str:
    """One note for the blocks that stay resident whatever the budget (bound_blocks), the plan's own choice too."""
    return f"{first_names(list(why))} kept resident for the session whatever the budget: {grouped_reasons(why)}"


@dataclass(frozen=True)
class PinnedPlanner:
    """replan(budget, profile) for the runtime: the policy on the workload, with the blocks that must stay bound
    (bound_blocks: a ViT's class token, a tied head's embedding: KiB to MiB) kept resident for the session."""

    policy: Callable[..., Plan]
    request: Any  # policies.PlanRequest (the front door imports policies lazily)

    def __call__(self, budget: Budget, profile: DeviceProfile) -> Plan:
        from policies import build_plan, fits_memory

        req = dataclasses.replace(self.request, budget=budget, profile=profile)
        why = bound_blocks(req.workload)  # once: it compares every block's module paths with every other's
        fmt = COMPUTE_FORMAT[req.compute_dtype]
        ask = req
        pinned: Plan | None = None
        for _ in range(PIN_ATTEMPTS):
            plan = self.policy(ask)
            wrong = unpinned_enclosing(plan, req.workload, why)
            if not wrong and ask is req:  # the policy kept them resident itself: the plan still says they must be
                return dataclasses.replace(plan, notes=(*plan.notes, _kept_note(why))) if why else plan
            blocks = [dataclasses.replace(bp, placement="resident", format=fmt, lifetime="session")
                      if bp.name in wrong else bp for bp in plan.blocks]
            notes = [f"{n} kept resident: {why[n]}" for n in wrong]
            if ask is not req:
                notes.append(f"planned within {fmt_bytes(ask.budget.vram_bytes)} of the "
                             f"{fmt_bytes(req.budget.vram_bytes)}: the rest holds the blocks kept resident")
            # re-scored by the simulator at the budget asked for: a plan that does not fit says so
            # a retry's own no-fit note is about the smaller ask: build_plan says whether this one fits
            kept = tuple(n for n in plan.notes if not n.startswith("does not fit"))
            pinned = build_plan(req, plan.policy, blocks, plan.execution, notes=(*kept, *notes),
                                kv_dtype=plan.kv_dtype)
            if fits_memory(pinned) or pinned.prediction is None:
                return pinned
            # ask again with what pinning added left out (the policy's plan plus it then fits the budget),
            # or for the shortfall less when that asks for fewer bytes
            over = pinned.prediction.peak_total_bytes - req.budget.vram_bytes
            added = pinned.prediction.peak_total_bytes - (plan.prediction.peak_total_bytes if plan.prediction else 0)
            smaller = min(ask.budget.vram_bytes - over, req.budget.vram_bytes - max(0, added))
            if smaller <= 0:
                break
            ask = dataclasses.replace(req, budget=dataclasses.replace(req.budget, vram_bytes=smaller))
        assert pinned is not None
        return pinned

    @property
    def profile(self) -> DeviceProfile:
        """The profile the first plan was made for: the runtime re-plans with it."""
        return self.request.profile
