"""The pinning repair: small streamed blocks that starve the prefetch ring are kept on the device."""

from sim_helpers import flat_profile, linear_block, make_plan

from policies import PlanOptions, PlanRequest, get_policy
from policies.base import build_plan
from policies.ours.pinning import pin_small_streamed
from policies.ours.ranking import better
from residency.plan import Budget
from residency.workload import PassSpec, PhaseSpec, Workload


def _small_then_big(steps: int = 4) -> Workload:
    """Per step: three tiny blocks (8 µs of compute each), then four big ones (0.2 ms copy, 0.54 ms compute)."""
    small = tuple(linear_block(f"dit.small.{i}", 128, 256) for i in range(3))
    big = tuple(linear_block(f"dit.blocks.{i}", 1024, 256) for i in range(4))
    blocks = small + big
    denoise = PhaseSpec("denoise", "latent_frame", (PassSpec(tuple(b.name for b in blocks), per_step=True),))
    return Workload(name="small-then-big", blocks=blocks, phases=(denoise,), steps=steps, context_frames=0)


def _all_streamed(w, profile, vram):
    req = PlanRequest(w, profile, Budget(vram, None), options=PlanOptions(bound=False))
    seed = make_plan(w, profile, {b.name: "streamed" for b in w.blocks}, vram=vram)
    plan = build_plan(req, "ours", seed.blocks, seed.execution)
    return req, plan


def test_small_streamed_blocks_before_a_big_one_are_kept_resident_and_the_stall_goes():
    w, profile = _small_then_big(), flat_profile(link_gbps=10, tflops=1, overlap=1.0)
    req, plan = _all_streamed(w, profile, 2**34)
    assert plan.prediction.stall_ms > 0.5  # each step's first big copy hides under 8 µs of compute only
    repaired = pin_small_streamed(req, plan, lambda a, b: better(a, b, None))
    placements = {b.name: b.placement for b in repaired.blocks}
    assert all(placements[f"dit.small.{i}"] == "resident" for i in range(3)), placements
    assert all(placements[f"dit.blocks.{i}"] == "streamed" for i in range(4)), placements
    assert repaired.prediction.stall_ms < 0.1 * plan.prediction.stall_ms
    assert repaired.prediction.frame_ms < plan.prediction.frame_ms
    assert repaired.prediction.quality_loss == plan.prediction.quality_loss  # same formats


def test_without_room_for_the_small_blocks_the_plan_is_left_as_it_is():
    w, profile = _small_then_big(), flat_profile(link_gbps=10, tflops=1, overlap=1.0)
    _, roomy = _all_streamed(w, profile, 2**34)
    req, plan = _all_streamed(w, profile, roomy.prediction.peak_total_bytes)  # not one byte to spare
    assert pin_small_streamed(req, plan, lambda a, b: better(a, b, None)) is plan


def test_the_planners_plan_does_not_stall_behind_small_streamed_blocks():
    w, profile = _small_then_big(), flat_profile(link_gbps=10, tflops=1, overlap=1.0)
    _, streamed = _all_streamed(w, profile, 2**34)
    # room for the two slots and the small blocks, not for a big block more
    vram = streamed.prediction.peak_total_bytes + 3 * w.by_name["dit.small.0"].nbytes("BF16") + 4096
    plan = get_policy("ours")(PlanRequest(w, profile, Budget(vram, None), options=PlanOptions()))
    assert plan.prediction.peak_total_bytes <= vram
    assert plan.prediction.stall_ms < 0.1 * streamed.prediction.stall_ms, plan.notes
