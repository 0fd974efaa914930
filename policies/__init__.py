"""Decision layer: policies that turn (workload, device profile, budget) into a Plan.

Ours and the peers' reproduced behaviours, all scored by the same simulator.
"""

from __future__ import annotations

from collections.abc import Callable

from policies.base import PlanRequest, build_plan, fits_memory
from residency.errors import ResidencyError
from residency.plan import Plan

PolicyFn = Callable[[PlanRequest], Plan]


def registry() -> dict[str, PolicyFn]:
    """Policy name -> plan function; ours first, then the peers in the order reports show them."""
    from policies.ours import plan as ours
    from policies.peers import PEERS

    return {"ours": ours, **PEERS}


def get_policy(name: str) -> PolicyFn:
    policies = registry()
    if name not in policies:
        raise ResidencyError(f"unknown policy {name!r}", hint="one of: " + ", ".join(policies) + ", all")
    return policies[name]


__all__ = ["PlanRequest", "PolicyFn", "build_plan", "fits_memory", "get_policy", "registry"]
