"""Stall-aware re-solves: the simulator's stalls charged back to the block classes whose copies caused them."""

import pytest
from sim_helpers import flat_profile, linear_block, make_plan

from policies import PlanOptions, PlanRequest
from policies.base import build_plan
from policies.ours.options import BlockClass, Option
from policies.ours.stalls import charged, class_penalties_s, stall_by_block_s, worth_resolving
from residency.plan import Budget
from residency.workload import PassSpec, PhaseSpec, Workload


def _encoder_then_dit() -> Workload:
    """Per frame: four encoder layers (large, 8 µs of compute each: their copies cannot hide), then four DiT blocks
    over four steps (0.54 ms of compute each, under which a copy hides)."""
    enc = tuple(linear_block(f"enc.layers.{i}", 1024, 2, "enc") for i in range(4))
    dit = tuple(linear_block(f"dit.blocks.{i}", 1024, 256) for i in range(4))
    phases = (PhaseSpec("encode", "latent_frame", (PassSpec(tuple(b.name for b in enc)),)),
              PhaseSpec("denoise", "latent_frame", (PassSpec(tuple(b.name for b in dit), per_step=True),)))
    return Workload(name="enc-then-dit", blocks=enc + dit, phases=phases, steps=4, context_frames=0)


def _request(w: Workload, vram: int) -> PlanRequest:
    return PlanRequest(w, flat_profile(link_gbps=10, tflops=1, overlap=1.0), Budget(vram, None),
                       options=PlanOptions(bound=False))


def test_the_stall_is_attributed_to_the_streamed_blocks_that_waited():
    w = _encoder_then_dit()
    req = _request(w, 2**34)
    seed = make_plan(w, req.profile, {b.name: "streamed" for b in w.blocks if b.component == "enc"})
    plan = build_plan(req, "ours", seed.blocks, seed.execution)
    stalls = stall_by_block_s(req, plan)
    assert plan.prediction.stall_ms > 0.1
    assert set(stalls) <= {b.name for b in w.blocks if b.component == "enc"}  # only the streamed layers waited
    assert sum(stalls.values()) * 1e3 == pytest.approx(plan.prediction.stall_ms, rel=1e-6)
    assert worth_resolving(plan)


def test_a_class_is_charged_its_stall_per_streamed_member_on_its_streamed_options_only():
    resident = Option("resident", "BF16", "compute", 1.0, 0.0, 10, 0, 0, 0.0)
    streamed = Option("streamed", "BF16", "compute", 1.0, 2.0, 0, 10, 0, 0.0)
    c = BlockClass(("a", "b", "c"), 1, (resident, streamed))
    w = Workload(name="abc", blocks=tuple(linear_block(n, 64, 4) for n in "abc"),
                 phases=(PhaseSpec("denoise", "latent_frame", (PassSpec(("a", "b", "c")),)),), steps=1,
                 context_frames=0)
    plan = make_plan(w, flat_profile(), {"a": "streamed", "b": "streamed"})
    penalties = class_penalties_s([c], plan, {"a": 0.3, "b": 0.1})
    assert penalties == {0: pytest.approx(0.2)}  # 0.4 s over two streamed members
    (out,) = charged([c], penalties)
    assert out.options[0] == resident
    assert (out.options[1].compute_s, out.options[1].copy_s) == (pytest.approx(1.2), pytest.approx(2.2))


def test_a_plan_is_replaced_by_the_fastest_one_of_its_quality():
    # the quality-first solves rank time only as a tie-break: a plan that streams what would fit is solved again
    # for time at its own loss, and every block comes back resident
    import importlib

    search = importlib.import_module("policies.ours.search")
    w = _encoder_then_dit()
    req = _request(w, 2**34)
    seed = make_plan(w, req.profile, {b.name: "streamed" for b in w.blocks}, depth=1)
    slow = build_plan(req, "ours", seed.blocks, seed.execution)
    fast = search.fastest_at_quality(req, slow)
    assert fast.prediction.quality_loss == pytest.approx(slow.prediction.quality_loss)
    assert fast.prediction.frame_ms < slow.prediction.frame_ms * (1 - 1e-3)
    assert fast.prediction.stall_ms == pytest.approx(0.0, abs=1e-9)
    assert all(b.placement == "resident" for b in fast.blocks)


def test_formats_the_profile_has_no_dequant_rate_for_are_named_in_the_notes():
    """The search skips them: a hand-edited profile without Q8_0 planned without it, and said nothing."""
    from dataclasses import replace

    from policies import get_policy

    w = _encoder_then_dit()
    full = flat_profile(link_gbps=10, tflops=1, overlap=1.0)
    assert not [n for n in get_policy("ours")(PlanRequest(w, full, Budget(2**34, None))).notes
                if n.startswith("not considered")]
    rates = {f: r for f, r in full.dequant_gweights_per_s.items() if f not in ("Q8_0", "Q6_K")}
    plan = get_policy("ours")(PlanRequest(w, replace(full, dequant_gweights_per_s=rates), Budget(2**34, None)))
    said = [n for n in plan.notes if n.startswith("not considered")]
    assert said == ["not considered: Q8_0, Q6_K (profile 'flat' has no dequant rate for them; `residency profile` "
                    "measures every format)"]
    assert not {"Q8_0", "Q6_K"} & {b.format for b in plan.blocks}
