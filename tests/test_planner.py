"""Our planner: fits its budget, monotone in VRAM and frame budget, never behind a peer, states its gaps."""

import pytest
from sim_helpers import flat_profile

from policies import PlanRequest, get_policy, registry
from residency.plan import Budget
from residency.workload import load_workload_file

GIB = 2**30
ours = get_policy("ours")  # as `residency plan` runs it: with the peers' plans among its candidates


@pytest.fixture(scope="module")
def lucid():
    from pipelines.catalog import catalog_paths

    return load_workload_file(catalog_paths()["lucid-500m"])


@pytest.fixture(scope="module")
def gpu():
    # An RX 7800 XT-like device: 25 GB/s pinned link, 40 TFLOP/s, 530 GB/s memory, 80% overlap.
    return flat_profile(link_gbps=25, tflops=40, memory_gbps=530, overlap=0.8, launch_us=8, dequant_gw=100)


def _request(w, profile, vram_gib, frame_ms=None):
    # the default options: the search is bounded by work, not wall time, so the monotonicity below holds under load
    return PlanRequest(w, profile, Budget(int(vram_gib * GIB), frame_ms))


@pytest.mark.parametrize("vram_gib", [16, 1.0, 0.6])
def test_the_plan_fits_its_memory_budget_in_the_simulator(lucid, gpu, vram_gib):
    plan = ours(_request(lucid, gpu, vram_gib))
    assert plan.prediction.peak_total_bytes <= int(vram_gib * GIB)


def test_more_vram_never_gives_a_slower_plan(lucid, gpu):
    times = [ours(_request(lucid, gpu, v)).prediction.frame_ms for v in (0.6, 0.8, 1.0, 1.4, 4.0)]
    assert all(b <= a * 1.0001 for a, b in zip(times, times[1:], strict=False)), times


def test_a_looser_frame_budget_never_gives_worse_quality(lucid, gpu):
    fastest = ours(_request(lucid, gpu, 1.0)).prediction.frame_ms
    losses = []
    for frame_ms in (fastest * 1.01, fastest * 1.1, fastest * 1.3, fastest * 1.8):
        plan = ours(_request(lucid, gpu, 1.0, frame_ms))
        assert plan.prediction.frame_ms <= frame_ms
        losses.append(plan.prediction.quality_loss)
    assert all(b <= a * 1.0001 for a, b in zip(losses, losses[1:], strict=False)), losses


def test_a_frame_budget_buys_quality_with_spare_time(lucid, gpu):
    fastest = ours(_request(lucid, gpu, 1.0))
    relaxed = ours(_request(lucid, gpu, 1.0, fastest.prediction.frame_ms * 1.6))
    assert relaxed.prediction.quality_loss < fastest.prediction.quality_loss
    assert relaxed.prediction.frame_ms <= fastest.prediction.frame_ms * 1.6


def test_ours_is_never_slower_than_a_peer_at_equal_or_better_quality(lucid, gpu):
    for vram in (16, 1.0, 0.7):
        req = _request(lucid, gpu, vram)
        mine = ours(req).prediction
        for name, fn in registry().items():
            if name == "ours":
                continue
            peer = fn(req)
            if peer.prediction.peak_total_bytes > req.budget.vram_bytes:
                continue
            if peer.prediction.quality_loss <= mine.quality_loss:
                assert mine.frame_ms <= peer.prediction.frame_ms * 1.001, (vram, name)


def test_an_unreachable_frame_budget_gives_the_gap_statement(lucid, gpu):
    floor = ours(_request(lucid, gpu, 16)).prediction.frame_ms  # everything resident
    budget = round(floor * 1.02, 1)  # holds with room for the whole model, not in 1 GiB
    plan = ours(_request(lucid, gpu, 1.0, budget))
    gap = [n for n in plan.notes if n.startswith("needs ")]
    assert not plan.holds_budget and gap
    assert f"budget {budget:.1f} ms" in gap[0] and "would hold with" in gap[0]


def test_a_budget_beyond_the_device_says_no_vram_would_do(lucid, gpu):
    plan = ours(_request(lucid, gpu, 16, 5.0))
    assert any("cannot hold" in n and "at any VRAM" in n for n in plan.notes)


def test_a_budget_below_any_plan_is_reported_not_fitting(lucid, gpu):
    plan = ours(_request(lucid, gpu, 0.2))
    assert plan.prediction.peak_total_bytes > 0.2 * GIB
    assert any(n.startswith("does not fit") for n in plan.notes)


def test_a_rivals_plan_that_fits_and_scores_better_is_adopted_and_named(lucid, gpu):
    from dataclasses import replace

    from policies.ours import plan as ours_alone

    req = _request(lucid, gpu, 1.0)
    mine = ours_alone(req)  # no rivals: the search's own plan
    twice_as_fast = replace(mine.prediction, frame_ms=mine.prediction.frame_ms / 2)
    rival_plan = replace(mine.with_prediction(twice_as_fast), policy="rival", notes=())
    chosen = ours_alone(req, rivals=(lambda _: rival_plan,))
    assert chosen.policy == "ours" and chosen.blocks == rival_plan.blocks
    assert "the placement of the rival policy scored best; adopted" in chosen.notes
    assert not any("adopted" in n for n in mine.notes)
