"""Measurement building blocks: timing statistics, the overlap formula, memory limits, the datasheet model.

GPU measurement functions run only with a CUDA/ROCm device (marked gpu).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from profiles import profiles_dir
from residency.device import (
    LINK_DIRECTIONS,
    Curve,
    measure_cpu,
    measure_cuda,
    measure_profile,
    profile_to_dict,
)
from residency.device.host_memory import HostMemory, cgroup_limit_bytes, cpu_reserve_bytes
from residency.device.measure import parse_device
from residency.device.measurements import PROVENANCE_FIELDS, Measurements, to_profile
from residency.device.timing import overlap_fraction, percentile, repeats_for, summarize
from residency.errors import ResidencyError, UsageError
from residency.formats import FORMATS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def datasheet():
    spec = importlib.util.spec_from_file_location("make_datasheet_profiles", REPO / "tools" / "make_datasheet_profiles.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


# ---- timing statistics
def test_spread_is_p10_to_p90_width_over_median():
    t = summarize([float(v) for v in range(1, 12)])  # 1..11: median 6, p10 2, p90 10
    assert (t.median_s, t.p10_s, t.p90_s) == (6.0, 2.0, 10.0)
    assert t.spread == pytest.approx(8 / 6)


def test_percentile_interpolates_between_samples():
    assert percentile([0.0, 10.0], 0.25) == 2.5


def test_identical_samples_have_no_spread():
    assert summarize([0.5] * 7).spread == 0.0


def test_repeats_fit_the_budget_within_bounds():
    assert repeats_for(0.01, 0.1) == 10
    assert repeats_for(1.0, 0.1) == 3
    assert repeats_for(1e-6, 1.0, hi=40) == 40


# ---- overlap formula
@pytest.mark.parametrize(("copy_s", "compute_s", "both_s", "expected"), [
    (1.0, 2.0, 2.0, 1.0),  # copy fully hidden under the longer compute
    (1.0, 2.0, 3.0, 0.0),  # serialized
    (1.0, 2.0, 2.5, 0.5),  # half the copy hidden
    (1.0, 2.0, 3.5, 0.0),  # slower than serial (contention): clipped
    (1.0, 2.0, 1.5, 1.0),  # faster than the longer alone (noise): clipped
])
def test_overlap_fraction(copy_s, compute_s, both_s, expected):
    assert overlap_fraction(copy_s, compute_s, both_s) == pytest.approx(expected)


# ---- host memory
def test_cgroup_v2_limit_is_read(tmp_path):
    (tmp_path / "memory.max").write_text("4294967296\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert cgroup_limit_bytes(tmp_path) == (4 * 2**30, 2**30, "cgroup v2")


def test_cgroup_v2_max_means_no_limit(tmp_path):
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_limit_bytes(tmp_path) is None


def test_cgroup_v1_unlimited_sentinel_means_no_limit(tmp_path):
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_limit_bytes(tmp_path) is None


def test_cpu_reserve_is_a_tenth_within_half_to_two_gib():
    assert cpu_reserve_bytes(2**30) == 2**29
    assert cpu_reserve_bytes(10 * 2**30) == 2**30
    assert cpu_reserve_bytes(512 * 2**30) == 2 * 2**30


# ---- devices
def test_parse_device_accepts_cpu_and_cuda_index():
    assert parse_device("cpu") == ("cpu", 0)
    assert parse_device("cuda") == ("cuda", 0)
    assert parse_device("CUDA:1") == ("cuda", 1)
    with pytest.raises(UsageError):
        parse_device("tpu:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_measuring_cuda_without_a_gpu_is_a_user_error():
    with pytest.raises(ResidencyError) as e:
        measure_profile("cuda:0", quick=True)
    assert "--device cpu" in e.value.hint


def test_cpu_link_measures_every_size_and_records_both_memory_kinds():
    small = dataclasses.replace(measure_cpu.QUICK, link_sizes_bytes=(64 * 2**10, 2**20), link_point_s=0.02)
    engine = measure_cpu.start_copy_engine()
    try:
        link = measure_cpu.measure_link(engine, small)
    finally:
        engine.stop()
    assert link["h2d_pinned"] is link["h2d_pageable"]
    assert link["h2d_pinned"].x == (64.0 * 2**10, 2.0**20)
    assert all(y > 0 for c in link.values() for y in c.y)
    assert all(len(c.spread) == len(c.x) for c in link.values())


def test_a_failed_copy_job_is_raised_to_the_measurement():
    engine = measure_cpu.start_copy_engine()
    try:
        assert measure_cpu.timed_copy(engine, lambda: None) >= 0
        with pytest.raises(RuntimeError):
            measure_cpu.timed_copy(engine, lambda: torch.empty(4).copy_(torch.empty(5)))
    finally:
        engine.stop()


def _measurements(backend: str) -> Measurements:
    curve = Curve((1.0, 2.0), (1.0, 2.0))
    return Measurements(
        name="test device", vendor="cpu", backend=backend, driver="", memory_total_bytes=8 * 2**30,
        memory_reserve_bytes=2**30, memory_usable_bytes=4 * 2**30, link={d: curve for d in LINK_DIRECTIONS},
        device_memory_gbps=10.0, matmul_tflops={"fp32": curve}, matmul_weight_dim=1024,
        matmul_small_tflops={"fp32": curve}, matmul_small_weight_dim=256, dequant_gweights_per_s={"Q8_0": 1.0},
        copy_compute_overlap=0.9, copy_slowdown=1.1, compute_slowdown=1.05, launch_overhead_us=2.0,
        elementwise_gelems_per_s=curve, compute_threads=1,
        # what only the CPU measures: attention curves, the re-warm after a matmul
        **({"attention_tflops": {"fp32": curve}, "conv_tflops": {"fp32": curve}, "matmul_rewarm_us": curve,
            "dequant_tensor_gweights_per_s": {"Q8_0": curve}, "dequant_fresh_factor": {"Q8_0": 0.9}}
           if backend == "cpu" else {}),
        dequant_call_us={"Q8_0": 20.0},
    )


@pytest.mark.parametrize(("backend", "notes"), [
    ("cpu", measure_cpu.provenance_notes(measure_cpu.QUICK, HostMemory(8 * 2**30, 6 * 2**30, "host"), 1)),
    ("cuda", measure_cuda.provenance_notes(measure_cuda.QUICK, {"NF4": "needs the bitsandbytes package"})),
], ids=["cpu", "cuda"])
def test_each_backend_says_how_it_measured_every_field_after_the_command(backend, notes):
    profile = to_profile(_measurements(backend), "residency profile --quick", notes)
    optional = ({"attention_tflops", "conv_tflops", "matmul_rewarm_us", "dequant_call_us",
                 "dequant_tensor_gweights_per_s", "dequant_fresh_factor"} if backend == "cpu"
                else {"dequant_call_us"})
    assert set(profile.provenance) == PROVENANCE_FIELDS | optional
    assert all(p.kind == "measured" and p.source.startswith("residency profile --quick — ")
               for p in profile.provenance.values())
    assert profile.link["h2d_pinned"].x == (1.0, 2.0)  # the curves stay Curves


def test_a_provenance_table_missing_a_field_is_refused():
    notes = measure_cuda.provenance_notes(measure_cuda.QUICK, {})
    del notes["link"]
    with pytest.raises(ValueError, match="link"):
        to_profile(_measurements("cuda"), "residency profile", notes)


# ---- the datasheet derating model
def test_pcie_x8_is_half_of_x16_and_gen5_twice_gen4(datasheet):
    assert datasheet.pcie_gbps(4, 8) == pytest.approx(datasheet.pcie_gbps(4, 16) / 2)
    assert datasheet.pcie_gbps(5, 16) == pytest.approx(2 * datasheet.pcie_gbps(4, 16))


def test_link_curve_is_latency_bound_small_and_peak_bound_large(datasheet):
    curve = datasheet.link_curve(25.0)
    n = curve.x[0]
    assert curve.y[0] == pytest.approx(n / (datasheet.LINK_LATENCY_S + n / 25e9) / 1e9)
    assert curve.y[-1] == pytest.approx(25.0, rel=0.01)
    assert list(curve.y) == sorted(curve.y)


def test_matmul_curve_is_weight_bound_at_few_rows_and_capped_at_many(datasheet):
    curve = datasheet.matmul_curve(100.0, 0.6, 500.0, weight_bytes=2)
    assert curve.at(16) == pytest.approx(500e9 * 2 * 16 / 2 / 1e12)  # 8 TFLOP/s from reading bf16 weights
    assert curve.at(4096) == pytest.approx(60.0)


def test_kquant_dequant_is_derated_more_than_legacy(datasheet):
    q4k, q4_0 = datasheet.dequant_gweights_per_s("Q4_K", 500.0), datasheet.dequant_gweights_per_s("Q4_0", 500.0)
    assert q4k / q4_0 == pytest.approx(datasheet.DEQUANT_EFFICIENCY_HEAVY / datasheet.DEQUANT_EFFICIENCY)
    assert datasheet.dequant_gweights_per_s("BF16", 500.0) == pytest.approx(500.0 * 0.7 / 4)


def test_shipped_profiles_match_the_generator(datasheet):
    for card in datasheet.CARDS:
        path = profiles_dir() / f"{card.slug}.json"
        shipped = json.loads(path.read_text())
        assert profile_to_dict(datasheet.build_profile(card, shipped["date"])) == shipped, card.slug
        assert set(shipped["dequant_gweights_per_s"]) == set(FORMATS)


def test_rtx_4060_ti_link_is_half_an_x16_card(datasheet):
    by_slug = {c.slug: datasheet.build_profile(c, "2026-01-01") for c in datasheet.CARDS}
    assert by_slug["rtx-4060-ti-16gb"].h2d_gbps(2**28) == pytest.approx(by_slug["rtx-4090"].h2d_gbps(2**28) / 2,
                                                                         rel=0.01)


# ---- GPU measurement (skipped without a CUDA/ROCm device)
# A schedule small enough for a test: seconds, where the quick profile takes most of a minute.
SMALL_GPU_SCHEDULE = dict(link_repeats=3, memcpy_bytes=16 * 2**20, matmul_dim=512, matmul_small_dim=256,
                          matmul_rows=(16, 256), matmul_repeats=3, dequant_shape=(64, 256), dequant_repeats=3,
                          overlap_copy_bytes=8 * 2**20, overlap_repeats=2)


@pytest.mark.gpu
def test_gpu_link_and_memory_measurements_are_positive():
    from residency.device import measure_cuda

    dev = torch.device("cuda", 0)
    total, free = measure_cuda.device_memory(dev)
    assert 0 < free <= total
    plan = measure_cuda.GpuSchedule(link_sizes_bytes=(2**20, 4 * 2**20), **SMALL_GPU_SCHEDULE)
    side = torch.cuda.Stream(dev)
    link = measure_cuda.measure_link(dev, side, plan)
    assert set(link) == {"h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable"}
    assert all(y > 0 for c in link.values() for y in c.y)
    assert measure_cuda.measure_memcpy_gbps(dev, torch.cuda.current_stream(dev), plan) > 0


@pytest.mark.gpu
def test_gpu_compute_measurements_are_positive_and_overlap_is_a_fraction():
    from residency.device import measure_cuda

    dev = torch.device("cuda", 0)
    plan = measure_cuda.GpuSchedule(link_sizes_bytes=(2**20,), **SMALL_GPU_SCHEDULE)
    stream = torch.cuda.current_stream(dev)
    assert all(y > 0 for y in measure_cuda.measure_matmul(dev, stream, "bf16", plan).y)
    rate, call_us = measure_cuda.measure_dequant(dev, stream, "Q4_K", plan)
    assert rate > 0 and call_us >= 0
    assert 0.0 <= measure_cuda.measure_overlap(dev, torch.cuda.Stream(dev), plan) <= 1.0
    assert measure_cuda.measure_launch_us(dev) > 0
    assert all(y > 0 for y in measure_cuda.measure_matmul(dev, stream, "bf16", plan, plan.matmul_small_dim).y)
    elementwise = measure_cuda.measure_elementwise(dev, stream, plan)
    assert elementwise.x[0] == 4096 and all(y > 0 for y in elementwise.y)
