"""Decision layer: policies that turn (workload, device profile, budget) into a Plan.

Ours and the peers' reproduced behaviours, all scored by the same simulator.
"""

from __future__ import annotations

from functools import partial

from policies.base import PlanOptions, PlanRequest, PolicyFn, Replanner, build_plan, fits_memory
from residency.errors import ResidencyError


def registry() -> dict[str, PolicyFn]:
    """Policy name -> plan function; ours first, then the peers in the order reports show them.

    Ours is given the peers as rivals: it adopts a peer's plan that fits and scores better than its own,
    so it is never worse than one (`policies.ours` itself knows no peer)."""
    from policies.ours import plan as ours
    from policies.peers import PEERS

    return {"ours": partial(ours, rivals=tuple(PEERS.values())), **PEERS}


def get_policy(name: str) -> PolicyFn:
    """The plan function registered as `name` (see registry()); raises ResidencyError if unknown."""
    policies = registry()
    if name not in policies:
        raise ResidencyError(f"unknown policy {name!r}", hint="one of: " + ", ".join(policies))
    return policies[name]


__all__ = ["PlanOptions", "PlanRequest", "PolicyFn", "Replanner", "build_plan", "fits_memory", "get_policy", "registry"]
