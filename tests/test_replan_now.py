"""`replan_now()`: memory given back with set_budget is used without the closed loop (a raise was acted on only by
the loop, or at the next cut's re-plan: a model streamed at its old budget with the memory to hold it all)."""

from __future__ import annotations

import pytest
import torch
from test_attach_front_door import Small, X, attach_small

import residency
from residency.errors import ResidencyError


def attach(model, vram):
    return attach_small(model, vram=vram)


def test_a_raised_budget_is_planned_for_at_once_and_the_outputs_stay_the_same():
    model = Small()
    with torch.no_grad():
        expected = model(X)
    with attach(model, "60%") as rt:
        before = rt.plan
        assert any(b.placement != "resident" or b.format != "F32" for b in before.blocks)
        out = rt(X)
        rt.set_budget("400%")
        assert rt.plan is before  # a raise alone changes nothing
        plan = rt.replan_now()
        assert rt.plan is plan and plan.budget.vram_bytes == rt.budget_bytes
        assert all(b.placement == "resident" and b.format == "F32" for b in plan.blocks)
        assert torch.equal(rt(X), expected)  # all of it resident at full precision now
    assert out.shape == expected.shape


def test_replan_now_with_no_plan_fitting_lets_go_as_a_cut_does_and_detached_is_refused():
    with attach(Small(), "100%") as rt:
        rt.ledger.budget_bytes = 64  # a cut far below anything, before the next block call acts on it
        with pytest.raises(residency.BudgetError, match=r"no plan fits the budget in force \(64 B\).*let go"):
            rt.replan_now()
        assert not rt.attached
        with pytest.raises(ResidencyError, match="not attached"):
            rt.replan_now()


def test_a_closed_loop_re_plan_made_against_the_replaced_plan_is_dropped():
    """A decision the loop had pending was made against the plan replan_now replaced: taken at the next call, its
    adopt_profile refused the new placements (the user's call failed) or its switch undid the new plan."""
    from residency.runtime.closed_loop import LoopOptions

    model = Small()
    with torch.no_grad():
        expected = model(X)
    options = LoopOptions(background=False, warmup_frames=0, calibrate_frames=50, miss_frames=2, min_frames_between=1)
    with pytest.warns(residency.PlanWarning), attach_small(model, vram="60%", closed_loop=options, fps=1e6) as rt:
        for _ in range(20):
            if rt.loop._pending is not None:
                break
            with torch.no_grad():
                model(X)
        assert rt.loop._pending is not None  # a re-plan made, to be decided at the next call
        rt.set_budget("400%")
        plan = rt.replan_now()
        with torch.no_grad():
            assert torch.equal(model(X), expected)
        assert rt.plan is plan and rt.loop._pending is None
