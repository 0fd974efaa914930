"""More VRAM never plans worse: where a smaller budget's plan holds the frame budget, a larger budget's plan holds
it too, at a quality loss no larger (it could always have chosen the smaller budget's plan, which still fits)."""

import pytest

from policies import PlanRequest, get_policy
from policies.base import fits_memory
from residency.commands.sources import shipped_sensitivity
from residency.device import load_profile
from residency.plan import Budget
from residency.session_setup import load_model


@pytest.mark.parametrize("frame_ms", [5.0, 5.4])
def test_a_larger_vram_budget_never_gives_a_worse_plan(frame_ms):
    # tiny on the 16 GB card, its DiT blocks streamed with the ring's stalls near the budget: at 138 MiB the MILP's
    # best-quality proposal stalled past it again and again (its tie in quality broken by linear time), and the
    # search settled for loss 0.102 where the plan it took at 136 MiB (loss 0.028, 5.33 ms) still fitted and held
    w = load_model("tiny").workload
    profile = load_profile("rtx-4060-ti-16gb")
    ours = get_policy("ours")
    best_loss = None
    for mib in (132, 134, 136, 138, 140, 142):
        plan = ours(PlanRequest(w, profile, Budget(mib * 2**20, frame_ms), exec_mode="auto",
                                sensitivity=shipped_sensitivity("tiny")))
        p = plan.prediction
        holds = fits_memory(plan) and p.frame_ms <= frame_ms
        if best_loss is not None:
            assert holds, f"{mib} MiB: {p.frame_ms:.2f} ms misses {frame_ms} ms held at a smaller budget"
            assert p.quality_loss <= best_loss * (1 + 1e-3), (mib, p.quality_loss, best_loss)
        if holds:
            best_loss = p.quality_loss if best_loss is None else min(best_loss, p.quality_loss)
    assert best_loss is not None  # the sweep reaches budgets where a plan holds: it tests something
