"""A planner for models whose own tensors enclose their blocks (a pipeline component's or a plain module's root
parameters and buffers): the policy's plan with those blocks made resident for the session, re-scored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from residency.device import DeviceProfile
from residency.front_door.vram import COMPUTE_FORMAT
from residency.plan import Budget, Plan
from residency.workload import Workload
from residency.workload.pipeline_phases import enclosing_blocks


def unpinned_enclosing(plan: Plan, workload: Workload) -> dict[str, str]:
    """Blocks enclosing others that the plan does not keep resident for the session: the runtime cannot
    hook them (residency.runtime.module_paths), so they must be (name -> what the plan made them)."""
    return {n: f"{plan.by_name[n].placement}/{plan.by_name[n].lifetime}" for n in enclosing_blocks(workload)
            if (plan.by_name[n].placement, plan.by_name[n].lifetime) != ("resident", "session")}


@dataclass(frozen=True)
class PinnedPlanner:
    """replan(budget, profile) for the runtime: the policy on the workload, with the blocks that enclose others
    (a component's or a plain model's loose tensors, such as a ViT's class token: a few KiB to MiB) kept
    resident for the session, as the runtime needs (it cannot hook them)."""

    policy: Callable[..., Plan]
    request: Any  # policies.PlanRequest (the front door imports policies lazily)

    def __call__(self, budget: Budget, profile: DeviceProfile) -> Plan:
        from policies import build_plan

        req = dataclasses.replace(self.request, budget=budget, profile=profile)
        plan = self.policy(req)
        wrong = unpinned_enclosing(plan, req.workload)
        if not wrong:
            return plan
        fmt = COMPUTE_FORMAT[req.compute_dtype]
        blocks = [dataclasses.replace(bp, placement="resident", format=fmt, lifetime="session")
                  if bp.name in wrong else bp for bp in plan.blocks]
        note = f"{', '.join(wrong)} kept resident: the runtime reads them all through the call"
        # re-scored by the simulator: a plan that no longer fits says so, and attach refuses it
        return build_plan(req, plan.policy, blocks, plan.execution, notes=(*plan.notes, note), kv_dtype=plan.kv_dtype)

    @property
    def profile(self) -> DeviceProfile:
        """The profile the first plan was made for: the runtime re-plans with it."""
        return self.request.profile
