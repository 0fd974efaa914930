"""An unpack's time over tensor size (dequant_tensor_gweights_per_s): measured, stored, costed, calibrated.

Timed on an 8M-weight matrix, whose fp32 output overflows a CPU's caches, the rate-and-call model predicted a
small model's unpacks (64K-400K weights a tensor) 1.4× slow; the curve costs each tensor at its own size.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from sim_helpers import assert_profile_refused, flat_profile, matrices_and_vectors_block, shipped_doc_with

from residency.device import load_profile, profile_from_dict, profile_to_dict
from residency.device.profile import Curve, tensor_unpack_s
from residency.device.profile_io import SCHEMA_2_FIELDS
from residency.simulate.costs import dequant_s

SIZES = (4096.0, 65536.0, 262144.0, 1048576.0, 8388608.0)


def _curve_of(seconds) -> Curve:
    """The curve a measurement timing each of SIZES at seconds(n) would record."""
    return Curve(SIZES, tuple(n / seconds(n) / 1e9 for n in SIZES))


@pytest.mark.parametrize(("call_us", "rate_gw"), [(20.0, 4.0), (110.0, 2.0), (0.0, 6.0)])
def test_a_call_and_rate_device_is_costed_exactly_at_every_size(call_us, rate_gw):
    def seconds(n):
        return call_us * 1e-6 + n / (rate_gw * 1e9)

    curve = _curve_of(seconds)
    for n in (512, 4096, 10_000, 196_608, 3e6, 8388608, 5e7):
        assert tensor_unpack_s(curve, n) == pytest.approx(seconds(n), rel=1e-9)


def test_sizes_between_samples_cost_their_own_time_not_the_large_matrix_rate():
    # cache-resident middle sizes run faster per weight than the 8M matrix (this EPYC's Q8_0 shape)
    rates = (0.15, 2.07, 4.13, 5.42, 4.01)
    curve = Curve(SIZES, rates)
    t = [n / (r * 1e9) for n, r in zip(SIZES, rates, strict=True)]
    assert tensor_unpack_s(curve, 262144) == pytest.approx(t[2])
    # linear in weights between two samples
    assert tensor_unpack_s(curve, (65536 + 262144) / 2) == pytest.approx((t[1] + t[2]) / 2)
    # beyond the last sample: on at the first-to-last slope, the rate the large matrix was fitted at
    slope = (t[-1] - t[0]) / (SIZES[-1] - SIZES[0])
    assert tensor_unpack_s(curve, 2 * SIZES[-1]) == pytest.approx(t[-1] + SIZES[-1] * slope)
    # below the first: never more than its time, never negative, growing with size
    small = [tensor_unpack_s(curve, n) for n in (1, 256, 1024, 4096)]
    assert all(0 <= a <= b for a, b in zip(small, small[1:], strict=False)) and small[-1] == pytest.approx(t[0])


def test_one_noisy_sample_neither_halves_a_large_tensor_nor_makes_a_smaller_one_dearer():
    rates = [0.15, 2.07, 4.13, 5.42, 4.01]
    calm = Curve(SIZES, tuple(rates))
    large = 37_748_736  # a 3072 × 12288 MLP matrix
    for i, noisy_rate in ((3, 0.6), (0, 0.05), (2, 40.0), (1, 0.5)):  # samples 3-8× off
        noisy = Curve(SIZES, tuple(noisy_rate if k == i else r for k, r in enumerate(rates)))
        assert tensor_unpack_s(noisy, large) == pytest.approx(tensor_unpack_s(calm, large), rel=0.05)
        sizes = [1, 100, 4096, 10_000, 65536, 100_000, 262144, 1e6, 8388608, large]
        costs = [tensor_unpack_s(noisy, n) for n in sizes]
        assert all(0 <= a <= b for a, b in zip(costs, costs[1:], strict=False)), (i, costs)
        if noisy_rate < rates[i] and i < 3:  # a slow sample below 1 M: the sizes above it keep their own cost
            for n in SIZES[i + 1:]:
                assert tensor_unpack_s(noisy, n) == pytest.approx(tensor_unpack_s(calm, n), rel=0.05), (i, n)


def test_a_block_costs_each_tensor_at_its_own_size():
    block = matrices_and_vectors_block([(512, 512)] * 4, [512] * 6)
    q8 = Curve(SIZES, (0.2, 2.0, 4.0, 5.0, 4.0))
    bf16 = Curve(SIZES, (0.6, 3.4, 6.8, 11.0, 8.0))
    plain = flat_profile(dequant_gw=0.5, backend="cpu")
    curved = dataclasses.replace(plain, dequant_tensor_gweights_per_s={"Q8_0": q8, "BF16": bf16})
    # fp32 compute: 4 matrices unpack from Q8_0, 6 vectors fall back to BF16 and convert too
    want = 4 * tensor_unpack_s(q8, 512 * 512) + 6 * tensor_unpack_s(bf16, 512)
    assert dequant_s(block, "Q8_0", "fp32", curved) == pytest.approx(want)
    # a format without a curve keeps the rate-and-call model
    assert dequant_s(block, "Q4_K", "bf16", curved) == pytest.approx(dequant_s(block, "Q4_K", "bf16", plain))


def test_mixed_sizes_in_one_format_cost_each_tensor_not_their_mean():
    # a VAE-like block: large convolution kernels and small biases, all converted from BF16
    block = matrices_and_vectors_block([(256, 2304), (256, 2304), (64, 64)], [256, 256, 64])
    bf16 = Curve(SIZES, (0.6, 3.4, 6.8, 11.0, 8.0))
    curved = dataclasses.replace(flat_profile(dequant_gw=0.5, backend="cpu"), dequant_tensor_gweights_per_s={"BF16": bf16})
    sizes = [256 * 2304, 256 * 2304, 64 * 64, 256, 256, 64]
    per_tensor = sum(tensor_unpack_s(bf16, n) for n in sizes)
    at_mean = len(sizes) * tensor_unpack_s(bf16, sum(sizes) / len(sizes))
    assert dequant_s(block, "BF16", "fp32", curved) == pytest.approx(per_tensor)
    assert abs(per_tensor - at_mean) > 0.05 * per_tensor  # the two differ here: the test tells them apart


def _measured_doc() -> dict:
    return shipped_doc_with("dequant_tensor_gweights_per_s", {"Q8_0": {"tensor_weights": [4096, 65536, 8388608],
                                                     "gweights_per_s": [0.2, 2.0, 4.0], "spread": []}})


def test_the_curve_round_trips_and_older_profiles_keep_their_fingerprint():
    profile = profile_from_dict(_measured_doc(), "mem")
    assert profile.dequant_tensor_gweights_per_s["Q8_0"].x == (4096, 65536, 8388608)
    assert profile_from_dict(profile_to_dict(profile), "again") == profile
    assert profile_to_dict(profile)["schema_version"] == 2
    without = dataclasses.replace(profile, dequant_tensor_gweights_per_s={})
    assert without.fingerprint() == load_profile("rx-7800-xt").fingerprint()
    assert profile.fingerprint() != without.fingerprint()
    assert "dequant_tensor_gweights_per_s" not in profile_to_dict(without)


KEY = "dequant_tensor_gweights_per_s"


@pytest.mark.parametrize(("mutate", "field", "words"), [
    (lambda d: d[KEY]["Q8_0"].update(gweights_per_s=[0.2, 0.0, 4.0]), f"{KEY}.Q8_0.gweights_per_s[1]", "must be positive"),
    (lambda d: d[KEY]["Q8_0"].update(tensor_weights=[4096, 4096, 8e6]), f"{KEY}.Q8_0.tensor_weights",
     "strictly increasing (4096 then 4096)"),
    (lambda d: d[KEY]["Q8_0"].update(gweights_per_s=[0.2, 2.0]), f"{KEY}.Q8_0", "equal length"),
    (lambda d: d[KEY]["Q8_0"].update(tensor_weights=[65536], gweights_per_s=[2.0]), f"{KEY}.Q8_0.tensor_weights",
     "at least 2 sizes"),
    (lambda d: d[KEY]["Q8_0"].update(tensor_weights=[4096.5, 65536, 8388608]), f"{KEY}.Q8_0.tensor_weights",
     "holds 4096.5: sizes are whole weights"),
    (lambda d: d[KEY].update(Q9_9=d[KEY]["Q8_0"]), f"{KEY}.Q9_9", "not known"),
    (lambda d: d["dequant_gweights_per_s"].pop("Q8_0"), f"{KEY}.Q8_0", "no dequant_gweights_per_s.Q8_0"),
    (lambda d: d["provenance"].pop(KEY), f"provenance.{KEY}", "missing"),
    (lambda d: d[KEY]["Q8_0"].update(tensor_weights=[4096, "64K", 8e6]), f"{KEY}.Q8_0.tensor_weights[1]",
     "weights of one tensor"),
    (lambda d: [d.pop(k, None) for k in SCHEMA_2_FIELDS if k != KEY] and d.update(schema_version=1), KEY,
     "needs schema_version 2"),
])
def test_a_bad_curve_names_the_field(mutate, field, words):
    doc = _measured_doc()
    mutate(doc)
    assert_profile_refused(doc, field, words)


def test_a_calibrated_dequant_scale_scales_the_curve_as_the_rate():
    from residency.telemetry.calibration import _calibrated_profile
    from residency.workload import Workload

    base = profile_from_dict(_measured_doc(), "mem")
    workload = Workload(name="w", blocks=(matrices_and_vectors_block([(512, 512)], []),), phases=(), steps=1, context_frames=0)
    cal = _calibrated_profile(base, workload, {}, None, {"Q8_0": 1.25}, None, None, None, "m", 16, "2026-12-06")
    got, was = cal.dequant_tensor_gweights_per_s["Q8_0"], base.dequant_tensor_gweights_per_s["Q8_0"]
    assert got.x == was.x
    for n in (4096, 100_000, 8388608):
        assert tensor_unpack_s(got, n) == pytest.approx(1.25 * tensor_unpack_s(was, n))
    assert cal.provenance[KEY].kind == "calibrated" and math.isclose(
        cal.dequant_gweights_per_s["Q8_0"], base.dequant_gweights_per_s["Q8_0"] / 1.25)
