"""The lower bound against every plan of a small workload: no placement, dequant side or ring depth that fits beats
it, and what every plan pays (a whole ring slot, the session phase's memory) is charged."""

import dataclasses
import itertools

import pytest
from sim_helpers import chain_workload, flat_profile, linear_block, make_plan

from residency.plan import BlockPlan, Budget, Execution, Plan
from residency.simulate import lower_bound_s, simulate
from residency.workload import PassSpec, PhaseSpec, Workload

MIB = 2**20
GPU_WORKSPACE = 128 * MIB
FRAME_SIZES = (1024, 512, 1024)  # dim of each frame block's one matrix: two sizes, so the slot's maximum matters


def _workload(frame_encoder: bool = False) -> Workload:
    """An encoder block run once per session, then three frame blocks per denoise step, two steps a frame; with
    `frame_encoder`, first a per-frame phase of two large blocks with little compute (a text encoder's layers):
    copies a ring cannot hide under the denoiser's compute."""
    encoder = linear_block("text.blocks.0", 1024, 64, "text")
    frame = tuple(linear_block(f"dit.blocks.{i}", d, 256) for i, d in enumerate(FRAME_SIZES))
    encode = PhaseSpec("encode", "session", (PassSpec(("text.blocks.0",)),))
    denoise = PhaseSpec("denoise", "latent_frame", (PassSpec(tuple(b.name for b in frame), per_step=True),))
    if not frame_encoder:
        return Workload("brute", (encoder, *frame), (encode, denoise), steps=2, context_frames=0)
    per_frame = tuple(linear_block(f"cond.blocks.{i}", 1024, 8, "cond") for i in range(2))
    condition = PhaseSpec("encode", "latent_frame", (PassSpec(tuple(b.name for b in per_frame)),))
    return Workload("brute-phases", (encoder, *per_frame, *frame), (encode, condition, denoise), steps=2,
                    context_frames=0)


def _frame_choices(fmt: str) -> list[tuple[str, str]]:
    """(placement, dequant side) a frame block can take in `fmt`."""
    if fmt == "BF16":
        return [("resident", "compute"), ("streamed", "compute")]
    return [("resident", "compute"), ("resident-quantized", "compute"), ("streamed", "compute"), ("streamed", "copy")]


def _plans(work: Workload, formats: tuple[str, ...], depth: int, vram: int):
    """Every plan at these frame-block formats and depth: each frame block's placement and dequant side, the
    encoder resident for its phase or streamed."""
    frame = [b for b in work.blocks if b.component != "text"]
    for encoder in ("resident", "streamed"):
        for choice in itertools.product(*(_frame_choices(f) for f in formats)):
            blocks = [BlockPlan("text.blocks.0", encoder, "BF16", lifetime="phase")]
            blocks += [BlockPlan(b.name, placement, fmt, dequant_on=side)
                       for b, fmt, (placement, side) in zip(frame, formats, choice, strict=True)]
            yield Plan(model=work.name, workload_fingerprint=work.fingerprint(), profile="flat",
                       profile_fingerprint="test", policy="test", budget=Budget(vram), blocks=tuple(blocks),
                       execution=Execution(prefetch_depth=depth), steps=work.steps, context_frames=0)


PROFILES = {
    "gpu, slow link": flat_profile(link_gbps=1.0, dequant_gw=2.0),
    "cpu, asymmetric interference": dataclasses.replace(flat_profile(link_gbps=5.0, overlap=0.5, dequant_gw=0.5,
                                                                     backend="cpu"),
                                                        copy_slowdown=1.5, compute_slowdown=1.2),
}


@pytest.mark.parametrize("name", PROFILES)
@pytest.mark.parametrize("formats", [("BF16",) * 3, ("Q8_0", "BF16", "Q4_K"), ("BF16",) * 5,
                                     ("Q8_0", "BF16", "BF16", "Q4_K", "BF16")])
def test_no_plan_that_fits_beats_the_bound(name, formats):
    # Cost: ~500 simulations of a four-block workload (~800 of the six-block one with a per-frame encode phase),
    # each plan scored once and then held to several budgets
    profile, work = PROFILES[name], _workload(frame_encoder=len(formats) == 5)
    for depth in (0, 1, 2):
        scored = [(p, simulate(work, p, profile).prediction) for p in _plans(work, formats, depth, 2**40)]
        peaks = sorted(pred.peak_total_bytes for _, pred in scored)
        for vram in (peaks[0], peaks[len(peaks) // 4], peaks[len(peaks) // 2], peaks[-1]):  # least memory to all
            fitting = [(p, pred) for p, pred in scored if pred.peak_total_bytes <= vram]
            bound_ms = lower_bound_s(work, dataclasses.replace(fitting[0][0], budget=Budget(vram)), profile) * 1e3
            fastest_ms = min(pred.frame_ms for _, pred in fitting)
            assert bound_ms <= fastest_ms * (1 + 1e-9), (depth, vram)


def test_a_streamed_block_is_charged_a_whole_slot_per_ring_slot():
    # four equal blocks, room for three: streaming one needs two slots (depth 1) of a block's size, so at most one
    # stays resident and three stream; a fractional bound that ignored the ring would stream one
    profile, work = flat_profile(link_gbps=1.0), chain_workload(n=4)
    block = 1024 * 1024 * 2
    streamed = make_plan(work, profile, {f"dit.blocks.{i}": "streamed" for i in (1, 2, 3)}, depth=1,
                         vram=GPU_WORKSPACE + 3 * block)
    pred = simulate(work, streamed, profile).prediction
    assert pred.peak_total_bytes <= streamed.budget.vram_bytes  # one resident block and two slots
    copy_ms = block / 1e9 * 1e3
    assert lower_bound_s(work, streamed, profile) * 1e3 == pytest.approx(3 * copy_ms)  # copy-bound: three copies


def test_the_session_phase_memory_counts_beside_the_frame_loop():
    # the encoder is as large as the room: resident in its phase it leaves no room for a frame block beside it, and
    # streamed it needs a slot of its own size, so every frame block streams in both cases
    work = _workload()
    profile = flat_profile(link_gbps=1.0)
    encoder = 1024 * 1024 * 2
    plan = max(_plans(work, ("BF16",) * 3, 0, GPU_WORKSPACE + encoder),
               key=lambda p: sum(b.placement == "streamed" for b in p.blocks))  # everything streamed: it fits
    assert simulate(work, plan, profile).prediction.peak_total_bytes <= plan.budget.vram_bytes
    bound_ms = lower_bound_s(work, plan, profile) * 1e3
    every_frame_block_streamed_ms = 2 * sum(d * d * 2 for d in FRAME_SIZES) / 1e9 * 1e3  # two steps, copy-bound
    assert bound_ms == pytest.approx(every_frame_block_streamed_ms)


def test_a_phase_copies_hide_only_under_its_own_compute_and_what_the_ring_holds_ahead():
    # Every block streams (the room holds only the ring). The per-frame encode phase copies two 2 MiB blocks and
    # computes little; the denoiser computes far longer than it copies. Over the whole frame the copies would hide
    # under the denoiser (T = its compute); but the ring (one slot at depth 0) holds one encoder copy ahead at most,
    # so the other lands in the encode phase's own window, and the bound charges it
    work, profile = _workload(frame_encoder=True), flat_profile(link_gbps=1.0, tflops=0.002)
    plan = max(_plans(work, ("BF16",) * 5, 0, 2**40), key=lambda p: sum(b.placement == "streamed" for b in p.blocks))
    plan = dataclasses.replace(plan, budget=Budget(GPU_WORKSPACE + 2 * MIB * 2 + 1024 * 256 * 4 * 2))
    encoder_copy_ms = 1024 * 1024 * 2 / 1e9 * 1e3
    encoder_ms = 2 * (2 * 1024 * 1024 * 8) / (0.002 * 1e12) * 1e3
    denoise_ms = 2 * sum(2 * d * d * 256 for d in FRAME_SIZES) / (0.002 * 1e12) * 1e3
    assert 2 * encoder_copy_ms + 2 * 2 * sum(d * d for d in FRAME_SIZES) / 1e9 * 1e3 < denoise_ms  # pooled: hidden
    bound_ms = lower_bound_s(work, plan, profile) * 1e3
    assert bound_ms == pytest.approx(max(encoder_ms, encoder_copy_ms) + denoise_ms, rel=1e-6)
    assert bound_ms <= simulate(work, plan, profile).prediction.frame_ms * (1 + 1e-9)
