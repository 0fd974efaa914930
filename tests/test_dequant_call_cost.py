"""An unpack costs its weights at the format's rate plus one call per tensor: measured, stored, costed.

A block of many small tensors (tiny's DiT block: 7 matrices, 14 vectors) dequantized 1.6× slower per weight
than the large matrix the rate is timed on; the per-call cost is what the rate alone did not see.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from sim_helpers import assert_profile_refused, flat_profile, matrices_and_vectors_block, shipped_doc_with

from residency.device import load_profile, profile_from_dict, profile_to_dict
from residency.device.measurements import dequant_rate_and_call
from residency.simulate.costs import dequant_s


@pytest.mark.parametrize(("rate_gw", "call_us"), [(0.8, 140.0), (0.3, 400.0), (2.0, 15.0), (50.0, 30.0)])
def test_rate_and_call_come_back_from_two_timed_sizes(rate_gw, call_us):
    def timed(n):
        return call_us * 1e-6 + n / (rate_gw * 1e9)

    large, small = 2048 * 4096, 16 * 256
    got_rate, got_call = dequant_rate_and_call(large, timed(large), small, timed(small))
    assert got_rate == pytest.approx(rate_gw, rel=1e-9)
    assert got_call == pytest.approx(call_us, rel=1e-6)


def test_a_small_call_timed_faster_per_weight_is_noise_not_a_negative_cost():
    large, small = 1 << 20, 4096
    rate, call = dequant_rate_and_call(large, 1e-3, small, 0.5 * small * 1e-3 / large)
    assert call == 0.0
    assert rate == pytest.approx(large / 1e-3 / 1e9)


@pytest.mark.parametrize(("matrices", "vectors"), [
    ([(768, 256), (256, 256), (1024, 256), (256, 1024)], [768, 256, 1024]),
    ([(4096, 4096)], []),
    ([(512, 512)] * 9, [512] * 20),
])
def test_each_converted_tensor_pays_one_call_of_its_stored_format(matrices, vectors):
    block = matrices_and_vectors_block(matrices, vectors)
    plain = dataclasses.replace(flat_profile(dequant_gw=0.5, backend="cpu"))
    calls = {"Q8_0": 140.0, "BF16": 12.0}
    costed = dataclasses.replace(plain, dequant_call_us=calls)
    # on the CPU (fp32 compute) the matrices are stored Q8_0 and the vectors fall back to BF16: both convert
    weights = sum(math.prod(s) for s in matrices) + sum(vectors)
    assert dequant_s(block, "Q8_0", "fp32", plain) == pytest.approx(weights / 0.5e9)
    extra = dequant_s(block, "Q8_0", "fp32", costed) - dequant_s(block, "Q8_0", "fp32", plain)
    assert extra == pytest.approx((len(matrices) * calls["Q8_0"] + len(vectors) * calls["BF16"]) * 1e-6)
    # in bf16 the fallen-back vectors are computed as stored: only the matrices convert
    bf16_extra = dequant_s(block, "Q8_0", "bf16", costed) - dequant_s(block, "Q8_0", "bf16", plain)
    assert bf16_extra == pytest.approx(len(matrices) * calls["Q8_0"] * 1e-6)
    assert dequant_s(block, "F32", "fp32", costed) == 0.0  # stored as computed: nothing to unpack


def _measured_doc() -> dict:
    return shipped_doc_with("dequant_call_us", {"Q8_0": 140.0, "Q4_K": 400.5, "BF16": 0.0})


def test_the_call_cost_round_trips_and_changes_the_fingerprint():
    profile = profile_from_dict(_measured_doc(), "mem")
    assert profile.dequant_call_us == {"Q8_0": 140.0, "Q4_K": 400.5, "BF16": 0.0}
    assert profile_from_dict(profile_to_dict(profile), "again") == profile
    assert profile_to_dict(profile)["schema_version"] == 2
    without = dataclasses.replace(profile, dequant_call_us={})
    assert without.fingerprint() == load_profile("rx-7800-xt").fingerprint()  # older profiles keep theirs
    assert profile.fingerprint() != without.fingerprint()
    assert "dequant_call_us" not in profile_to_dict(without)


@pytest.mark.parametrize(("mutate", "field", "words"), [
    (lambda d: d["dequant_call_us"].update(Q8_0=-1.0), "dequant_call_us.Q8_0", "≥ 0"),
    (lambda d: d["dequant_call_us"].update(Q8_0=2e5), "dequant_call_us.Q8_0", "at most"),
    (lambda d: d["dequant_call_us"].update(Q8_0="140 us"), "dequant_call_us.Q8_0", "microseconds"),
    (lambda d: d["dequant_call_us"].update(Q9_9=1.0), "dequant_call_us.Q9_9", "not known"),
    (lambda d: d["dequant_gweights_per_s"].pop("Q4_K"), "dequant_call_us.Q4_K", "no dequant_gweights_per_s.Q4_K"),
    (lambda d: d["provenance"].pop("dequant_call_us"), "provenance.dequant_call_us", "missing"),
    (lambda d: d.update(dequant_call_us=[140.0]), "dequant_call_us", "JSON object"),
])
def test_a_bad_call_cost_names_the_field(mutate, field, words):
    doc = _measured_doc()
    mutate(doc)
    assert_profile_refused(doc, field, words)


def test_the_cpu_measurement_times_a_small_and_a_large_unpack():
    from residency.device import measure_cpu

    # the schedule's matrix is one of the curve's own sizes: it is timed once, the sizes stay strictly growing
    schedule = dataclasses.replace(measure_cpu.QUICK, dequant_shape=(256, 1024), dequant_point_s=0.05)
    engine = measure_cpu.start_copy_engine()
    try:
        rate, call_us, curve, fresh = measure_cpu.measure_dequant("Q8_0", schedule, engine)
    finally:
        engine.stop()
    assert rate > 0 and math.isfinite(rate)
    assert 0.2 <= fresh <= 1.0  # an input just copied into a slot unpacks no slower than one from DRAM
    assert 0.0 <= call_us < 1e5
    assert curve.x == (16 * 256, 64 * 1024, 256 * 1024)
    assert all(y > 0 and math.isfinite(y) for y in curve.y) and len(curve.spread) == 3
    # the largest sample's rate is the effective one of the large matrix the rate and call were fitted on
    assert curve.y[-1] == pytest.approx(256 * 1024 / (call_us * 1e-6 + 256 * 1024 / (rate * 1e9)) / 1e9, rel=1e-6)
