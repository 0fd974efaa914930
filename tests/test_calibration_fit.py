"""The calibration fitter recovers known engine rates from synthetic telemetry, and what it fits transfers.

The telemetry is the simulator's own timeline under a "true" profile (the base profile with its link, compute
and slowdowns changed by known factors), turned into recorder rows, with noise: fitting the base profile to it
must find the factors, and the calibrated profile must predict the true timeline — for the plan it was fitted
on and for another plan of the same model.
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict

import numpy as np
import pytest
from sim_helpers import flat_profile, linear_block, make_plan

from residency.device.profile import Curve
from residency.errors import ResidencyError
from residency.simulate import simulate
from residency.telemetry.calibration import calibrate, for_workload, robust_median, stretch
from residency.telemetry.recorder import COLUMNS, TelemetrySnapshot
from residency.workload import PassSpec, PhaseSpec, Workload

FRAMES = 14


def two_component_workload() -> Workload:
    """Six DiT blocks and two decoder blocks, one pass each per frame."""
    dit = tuple(linear_block(f"dit.blocks.{i}", 1024, 256) for i in range(6))
    dec = tuple(linear_block(f"decoder.blocks.{i}", 1024, 64, component="decoder") for i in range(2))
    phases = (PhaseSpec("denoise", "latent_frame", (PassSpec(tuple(b.name for b in dit), per_step=True),)),
              PhaseSpec("decode", "latent_frame", (PassSpec(tuple(b.name for b in dec)),)))
    return Workload(name="two-part", blocks=dit + dec, phases=phases, steps=2, context_frames=0)


def base_profile(link_gbps=2.0):
    """2 GB/s: copy-bound (every call runs beside a copy); 20 GB/s: compute-bound (some calls run alone)."""
    return flat_profile(link_gbps=link_gbps, tflops=0.5, overlap=0.6, backend="cpu")


def true_profile(base, copy_x=2.5, dit_x=1.3, dec_x=0.8, compute_slowdown=1.3, copy_slowdown=1.2):
    """The machine as it really is: copies copy_x× slower, DiT compute dit_x×, decoder dec_x×."""
    link = {k: Curve(c.x, tuple(y / copy_x for y in c.y)) for k, c in base.link.items()}
    return dataclasses.replace(base, link=link, compute_scale={"dit": dit_x, "decoder": dec_x},
                               compute_slowdown=compute_slowdown, copy_slowdown=copy_slowdown)


def telemetry_from(workload, plan, profile, noise=0.0, seed=0) -> TelemetrySnapshot:
    """The simulated timeline of FRAMES frames as the recorder would have recorded it (seconds)."""
    sim = simulate(workload, plan, profile, frames=FRAMES, bound=False)
    names = [b.name for b in plan.blocks]
    copies, dequants = defaultdict(list), defaultdict(list)
    for e in sim.events:
        if e.track == "copy" and not e.label.startswith("load "):
            copies[(e.frame, e.label)].append(e)
        elif e.track == "dequant":
            dequants[(e.frame, e.label)].append(e)
    seen = defaultdict(int)
    rng = random.Random(seed)
    per_frame = defaultdict(list)
    for e in sim.events:
        if e.track != "compute" or e.label.startswith("load "):
            continue
        k = seen[(e.frame, e.label)]
        seen[(e.frame, e.label)] += 1
        deq = dequants[(e.frame, e.label)][k] if dequants[(e.frame, e.label)] else None
        ready = (deq.start_ms if deq else e.start_ms) / 1e3
        end = e.start_ms / 1e3 + (e.end_ms - e.start_ms) / 1e3 * (1 + rng.uniform(-noise, noise))
        row = [e.frame, names.index(e.label), ready, ready, e.start_ms / 1e3, end, 0.0, 0.0, 0.0, 0, 0.0]
        if copies[(e.frame, e.label)]:
            c = copies[(e.frame, e.label)][k]
            row[6:11] = [c.start_ms / 1e3, c.end_ms / 1e3, c.end_ms / 1e3, c.nbytes, 1.0]
        per_frame[e.frame].append(row)
    rows = []
    frames = []
    record = dataclasses.make_dataclass("F", ["frame", "frame_ms"])
    for f in sorted(per_frame):
        r = np.array(per_frame[f], dtype=np.float64).reshape(-1, COLUMNS)
        r = r[np.argsort(r[:, 4], kind="stable")]
        r[1:, 2] = r[:-1, 5]  # a call enters when the one before it returned: waiting for a copy is its stall
        rows.append(r)
        frames.append(record(f, (r[-1, 5] - r[0, 2]) * 1e3))
    rows, frames = tuple(rows), tuple(frames)
    return TelemetrySnapshot(frames, rows, tuple(names), None, ())


def streamed_plan(workload, profile, streamed=("dit.blocks.1", "dit.blocks.3", "dit.blocks.5", "decoder.blocks.1")):
    return make_plan(workload, profile, {n: "streamed" for n in streamed}, depth=1)


def test_stretch_is_one_alone_and_the_slowdown_when_always_shared():
    assert stretch(np.array([0.0]), 3.0)[0] == 1.0
    assert stretch(np.array([1.0]), 3.0)[0] == pytest.approx(3.0)


def test_robust_median_drops_outliers():
    assert robust_median([1.0, 1.1, 0.9, 1.05, 40.0]) == pytest.approx(1.025)


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_fitter_recovers_known_rates(noise):
    w = two_component_workload()
    base = base_profile(link_gbps=20.0)
    truth = true_profile(base)
    plan = streamed_plan(w, base)
    fit = calibrate(telemetry_from(w, plan, truth, noise=noise), w, plan, base, model="two-part")
    tol = 0.03 + noise
    # each block runs at one share beside the copies here, so its scale and the slowdown are not told apart:
    # the base's slowdown (1.4) stands in for the true one (1.3) and a block always beside a copy is off by
    # their ratio, at most 7 % — but its time beside the copy is what it really is
    for key, scale in fit.compute_scale.items():
        assert scale == pytest.approx(1.3 if key.startswith("dit") else 0.8, rel=0.08 + noise), key
    assert simulate(w, plan, fit.profile, bound=False).prediction.frame_ms == pytest.approx(
        simulate(w, plan, truth, bound=False).prediction.frame_ms, rel=tol)
    # every copy runs beside compute: the copy slowdown is not separable either; the scale absorbs the rest
    assert fit.copy_slowdown is None
    assert fit.copy_scale * fit.profile.copy_slowdown_factor() == pytest.approx(2.5 * 1.2, rel=tol)
    assert fit.frames == FRAMES - 2
    assert fit.profile.calibration.workload_fingerprint == w.fingerprint()
    assert fit.profile.calibration.base_fingerprint == base.fingerprint()
    assert fit.profile.provenance["link"].kind == "calibrated"


def test_a_slowdown_is_read_from_a_block_seen_at_different_shares():
    from residency.telemetry.calibration import _Points, _pooled_slowdown

    rng = random.Random(0)
    blocks = []
    for scale in (0.7, 1.0, 2.5):  # each block its own model error, one device slowdown
        pts = _Points()
        for _ in range(30):
            f = rng.uniform(0.0, 1.0)
            pts.add(scale * stretch(np.array([f]), 1.6)[0] * (1 + rng.uniform(-0.03, 0.03)), 1.0, f)
        blocks.append(pts)
    assert _pooled_slowdown(blocks) == pytest.approx(1.6, rel=0.05)
    steady = _Points()
    for _ in range(30):
        steady.add(1.2, 1.0, 0.4)  # always at one share: nothing to read
    assert _pooled_slowdown([steady]) is None


@pytest.mark.parametrize("step", [1.5, 2.0, 3.0, 4.0, 12.0])
def test_a_spread_seen_only_across_time_is_a_confound_and_is_not_read(step):
    """A disturbance that starts mid-window slows the calls `step`× and lengthens the copies they run beside (share
    0.2 calm, 0.8 disturbed): read as interference across the window, that line is a slowdown of 1.9× (1.5× step)
    to past the range. Within each half the shares do not spread, so nothing is read, and a block whose calls keep
    a true slowdown still gives it, the step in its level between the halves moving nothing."""
    from residency.telemetry.calibration import _Points, _pooled_slowdown

    rng = random.Random(1)
    confounded, true = _Points(), _Points()
    for i in range(40):
        disturbed = i >= 20
        f = (0.8 if disturbed else 0.2) + rng.uniform(-0.05, 0.05)
        confounded.add((step if disturbed else 1.0) * (1 + rng.uniform(-0.03, 0.03)), 1.0, f)
        g = rng.uniform(0.0, 1.0)
        level = 1.4 * (1.3 if disturbed else 1.0)
        true.add(level * stretch(np.array([g]), 1.5)[0] * (1 + rng.uniform(-0.03, 0.03)), 1.0, g)
    assert _pooled_slowdown([confounded]) is None
    assert _pooled_slowdown([confounded, true]) == pytest.approx(1.5, rel=0.05)


def test_calibrated_profile_predicts_the_true_timeline_for_another_plan_too():
    w = two_component_workload()
    base = base_profile()
    truth = true_profile(base)
    fitted_on = streamed_plan(w, base)
    fit = calibrate(telemetry_from(w, fitted_on, truth, noise=0.03), w, fitted_on, base)
    other = streamed_plan(w, base, streamed=("dit.blocks.0", "dit.blocks.2", "decoder.blocks.0"))
    for plan in (fitted_on, other, make_plan(w, base)):
        true_ms = simulate(w, plan, truth, bound=False).prediction.frame_ms
        base_ms = simulate(w, plan, base, bound=False).prediction.frame_ms
        fitted_ms = simulate(w, plan, fit.profile, bound=False).prediction.frame_ms
        assert abs(base_ms / true_ms - 1) > 0.15  # the base profile is far off ...
        assert fitted_ms == pytest.approx(true_ms, rel=0.10)  # ... the calibrated one within 10 %


def test_noise_and_outliers_do_not_move_the_fit():
    w = two_component_workload()
    base = base_profile(link_gbps=20.0)
    truth = true_profile(base)
    plan = streamed_plan(w, base)
    snap = telemetry_from(w, plan, truth, noise=0.03, seed=1)
    rows = [r.copy() for r in snap.rows]
    rows[5][2, 5] += 0.5  # one call 500 ms late: a page fault, a context switch
    fit = calibrate(dataclasses.replace(snap, rows=tuple(rows)), w, plan, base)
    assert fit.compute_scale["dit.blocks.1"] == pytest.approx(1.3, rel=0.05)


def test_compute_scales_belong_to_their_model():
    w = two_component_workload()
    base = base_profile()
    plan = streamed_plan(w, base)
    fit = calibrate(telemetry_from(w, plan, true_profile(base)), w, plan, base)
    assert for_workload(fit.profile, w) is fit.profile
    other = dataclasses.replace(w, name="other", steps=3)
    moved = for_workload(fit.profile, other)
    assert moved.compute_scale == {} and moved.link == fit.profile.link


def test_a_resident_plan_calibrates_compute_and_keeps_the_link():
    w = two_component_workload()
    base = base_profile()
    plan = make_plan(w, base)
    fit = calibrate(telemetry_from(w, plan, true_profile(base)), w, plan, base)
    assert fit.copy_scale is None and fit.profile.link == base.link
    assert fit.compute_scale["dit.blocks.0"] == pytest.approx(1.3, rel=0.02)


def test_too_few_frames_is_a_clear_error():
    w = two_component_workload()
    base = base_profile()
    plan = make_plan(w, base)
    snap = telemetry_from(w, plan, base)
    short = TelemetrySnapshot(snap.frames[:2], snap.rows[:2], snap.block_names, None, ())
    with pytest.raises(ResidencyError, match="after the first 2"):
        calibrate(short, w, plan, base)


def test_a_dequant_fitted_as_a_whole_scales_its_rate_and_its_per_call_cost_alike():
    w = two_component_workload()
    base = dataclasses.replace(base_profile(link_gbps=20.0), dequant_gweights_per_s={"Q8_0": 2.0, "BF16": 4.0},
                               dequant_call_us={"Q8_0": 300.0})
    # the machine dequantizes 1.8× slower than profiled, per weight and per call
    truth = dataclasses.replace(base, dequant_gweights_per_s={"Q8_0": 2.0 / 1.8, "BF16": 4.0},
                                dequant_call_us={"Q8_0": 540.0})
    plan = make_plan(w, base, {f"dit.blocks.{i}": "streamed" for i in (1, 3, 5)}, fmt="Q8_0", depth=1)
    fit = calibrate(telemetry_from(w, plan, truth, noise=0.02), w, plan, base)
    assert fit.dequant_scale["Q8_0"] == pytest.approx(1.8, rel=0.05)
    assert fit.profile.dequant_call_us["Q8_0"] == pytest.approx(540.0, rel=0.05)
    true_ms = simulate(w, plan, truth, bound=False).prediction.frame_ms
    assert simulate(w, plan, fit.profile, bound=False).prediction.frame_ms == pytest.approx(true_ms, rel=0.03)


def _kv_workload(context_frames: int = 12) -> Workload:
    """Four DiT blocks whose attention to cached frames is ~half their compute at the full window."""
    blocks = tuple(dataclasses.replace(linear_block(f"dit.blocks.{i}", 256, 64), context_tokens_per_frame=64,
                                       kv_channels_per_token=512, context_attn_flops_per_token_pair=4.0 * 256 * 12)
                   for i in range(4))
    phases = (PhaseSpec("denoise", "latent_frame", (PassSpec(tuple(b.name for b in blocks), per_step=True,
                                                             kv="read"),)),)
    return Workload(name="kv", blocks=blocks, phases=phases, steps=2, context_frames=context_frames)


def _kv_telemetry(w, plan, base, kv_read, kv_said, scale=1.3, frames=16):
    """Recorder rows of frames 1..`frames` whose blocks took `scale`× the model at kv_read(f) cached frames, each
    frame's record saying kv_said(f) (None: its session did not say)."""
    from residency.simulate.costs import compute_s

    rows, records, t = [], [], 0.0
    record = dataclasses.make_dataclass("F", ["frame", "frame_ms", "kv_frames"])
    for f in range(1, frames + 1):
        r = []
        for _step in range(w.steps):
            for i, (spec, bp) in enumerate(zip(w.blocks, plan.blocks, strict=True)):
                d = scale * compute_s(spec, bp, base, kv_read(f), True, plan.kv_dtype, 1)
                r.append([f, i, t, t, t, t + d, 0.0, 0.0, 0.0, 0, 0.0])
                t += d
        rows.append(np.array(r, dtype=np.float64))
        records.append(record(f, (r[-1][5] - r[0][2]) * 1e3, kv_said(f)))
    return TelemetrySnapshot(tuple(records), tuple(rows), tuple(b.name for b in w.blocks), None, ())


def test_frames_while_the_kv_window_fills_are_fitted_at_the_frames_they_read():
    from residency.simulate.costs import compute_s

    w = _kv_workload()
    base = base_profile(link_gbps=20.0)
    plan = make_plan(w, base)  # all resident: compute only
    full = compute_s(w.blocks[0], plan.blocks[0], base, 12, True, plan.kv_dtype, 1)
    assert compute_s(w.blocks[0], plan.blocks[0], base, 2, True, plan.kv_dtype, 1) < 0.7 * full  # it matters here
    # a fresh session: frame f reads min(f, 12) cached frames and says so; nine of frames 3..16 before the window is full
    filling = _kv_telemetry(w, plan, base, lambda f: min(f, 12), lambda f: min(f, 12))
    for key, scale in calibrate(filling, w, plan, base, model="kv").compute_scale.items():
        assert scale == pytest.approx(1.3, rel=1e-6), key  # read at the full window: 1.03
    # attached to a session long running: its frames are numbered 1.. from the attach, yet read the full window
    running = _kv_telemetry(w, plan, base, lambda f: 12, lambda f: 12)
    unsaid = _kv_telemetry(w, plan, base, lambda f: 12, lambda f: None)  # a session that does not say: full
    for snap in (running, unsaid):
        for key, scale in calibrate(snap, w, plan, base, model="kv").compute_scale.items():
            assert scale == pytest.approx(1.3, rel=1e-6), key  # by frame number, 1.84


def test_a_fitted_dequant_scales_the_blocks_fallen_back_vectors_too():
    """A Q8_0 block's norms and biases unpack from BF16 (fp32 compute): its measured dequant is both formats'.
    Scaling Q8_0 alone left the BF16 share at the profile's time, under-predicting the block's dequant."""
    from sim_helpers import matrices_and_vectors_block

    from residency.simulate.costs import dequant_s

    one = matrices_and_vectors_block([(512, 512)] * 4, [512] * 6)
    blocks = tuple(dataclasses.replace(one, name=f"dit.blocks.{i}") for i in range(6))
    w = Workload(name="vec", blocks=blocks, steps=2, context_frames=0,
                 phases=(PhaseSpec("denoise", "latent_frame", (PassSpec(tuple(b.name for b in blocks), per_step=True),)),))
    base = dataclasses.replace(base_profile(link_gbps=20.0), dequant_gweights_per_s={"Q8_0": 2.0, "BF16": 4.0},
                               dequant_call_us={"Q8_0": 50.0, "BF16": 50.0})
    truth = dataclasses.replace(base, dequant_gweights_per_s={"Q8_0": 2.0 / 1.5, "BF16": 4.0 / 1.5},
                                dequant_call_us={"Q8_0": 75.0, "BF16": 75.0})  # the CPU unpacks 1.5× slower
    plan = make_plan(w, base, {"dit.blocks.1": "streamed", "dit.blocks.3": "streamed"}, fmt="Q8_0")
    plan = dataclasses.replace(plan, blocks=tuple(dataclasses.replace(bp, compute_dtype="fp32") for bp in plan.blocks))
    fallback = dequant_s(one, "Q8_0", "fp32", base) - dequant_s(
        dataclasses.replace(one, tensors=one.tensors[:4]), "Q8_0", "fp32", base)
    assert fallback > 0.2 * dequant_s(one, "Q8_0", "fp32", base)  # the vectors' share matters here
    fit = calibrate(telemetry_from(w, plan, truth, noise=0.02), w, plan, base)
    assert fit.dequant_scale["Q8_0"] == pytest.approx(1.5, rel=0.05)
    assert dequant_s(one, "Q8_0", "fp32", fit.profile) == pytest.approx(dequant_s(one, "Q8_0", "fp32", truth), rel=0.05)
    assert fit.profile.dequant_gweights_per_s["BF16"] == pytest.approx(4.0 / 1.5, rel=0.05)
