"""Interference per engine: the profile fields (schema 2), the simulator's two slowdowns, the frame-time floor,
calibrated compute scale, and the block-shaped probe that measures the slowdowns."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from sim_helpers import chain_workload, flat_profile, linear_block, make_plan

from residency.device import load_profile, profile_from_dict, profile_to_dict, save_profile
from residency.device.measurements import calls_during, slowdowns
from residency.device.profile import Calibration
from residency.device.profile_io import PROFILE_SCHEMA_VERSION, profile_path
from residency.errors import ResidencyError
from residency.simulate import simulate
from residency.simulate.bounds import interference_coefficients
from residency.simulate.costs import call_cost
from residency.simulate.engine import Job, run
from residency.workload import PassSpec, PhaseSpec, Workload

CALIBRATION = Calibration(base_fingerprint="0123456789abcdef", workload_fingerprint="fedcba9876543210",
                          model="lucid-500m", frames=24, date="2026-12-01", note="residency calibrate")


def _measured(profile, copy_slowdown=1.3, compute_slowdown=1.1, **kw):
    """`profile` with measured slowdowns (and their provenance), plus any other field in `kw`."""
    provenance = dict(profile.provenance)
    provenance.update({k: dataclasses.replace(profile.provenance["link"], source=f"test probe for {k}")
                       for k in ("copy_slowdown", "compute_slowdown")})
    return dataclasses.replace(profile, copy_slowdown=copy_slowdown, compute_slowdown=compute_slowdown,
                               provenance=provenance, **kw)


V1_DROPPED = ("graph_replay_us_per_kernel", "compiled_dispatch_fraction", "compile_s_per_block_class",
              "graph_pool_bytes_per_class")


@pytest.fixture
def v1(tmp_path):
    """A shipped datasheet profile written as schema 1 (before interference, calibration and exec-mode figures)."""
    doc = json.loads(profile_path("rx-7800-xt").read_text())
    for key in V1_DROPPED:
        doc.pop(key, None)
        doc["provenance"].pop(key, None)
    doc["schema_version"] = 1
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(doc))
    return load_profile(str(path))


@pytest.fixture
def v2_doc(v1) -> dict:
    return profile_to_dict(_measured(v1, compute_scale={"dit": 1.25, "decoder": 0.8}, calibration=CALIBRATION))


# ---------------------------------------------------------------- profile fields and JSON
def test_a_version_1_profile_loads_with_the_new_fields_at_their_defaults(v1):
    assert (v1.copy_slowdown, v1.compute_slowdown, v1.compute_scale, v1.calibration) == (0.0, 0.0, {}, None)
    o = v1.copy_compute_overlap
    assert v1.copy_slowdown_factor() == v1.compute_slowdown_factor() == 2.0 - o


def test_the_symmetric_factor_clamps_the_overlap():
    assert flat_profile(overlap=1.0).copy_slowdown_factor() == 1.0
    assert flat_profile(overlap=0.0).compute_slowdown_factor() == 2.0
    assert dataclasses.replace(flat_profile(), copy_compute_overlap=1.5).copy_slowdown_factor() == 1.0


def test_measured_slowdowns_replace_the_symmetric_model_one_engine_at_a_time():
    profile = dataclasses.replace(flat_profile(overlap=0.5), copy_slowdown=1.4)
    assert profile.copy_slowdown_factor() == 1.4
    assert profile.compute_slowdown_factor() == 1.5


def test_without_the_new_fields_the_document_stays_version_1_and_round_trips(v1, tmp_path):
    doc = profile_to_dict(v1)
    assert doc["schema_version"] == 1
    assert not {"copy_slowdown", "compute_slowdown", "compute_scale", "calibration"} & set(doc)
    again = load_profile(save_profile(v1, tmp_path / "p.json"))
    assert again == v1 and again.fingerprint() == v1.fingerprint()


def test_with_the_new_fields_the_document_is_version_2_and_round_trips(v1, v2_doc, tmp_path):
    assert v2_doc["schema_version"] == PROFILE_SCHEMA_VERSION == 2
    assert v2_doc["copy_slowdown"] == 1.3 and v2_doc["compute_slowdown"] == 1.1
    assert v2_doc["compute_scale"] == {"dit": 1.25, "decoder": 0.8}
    assert v2_doc["calibration"]["frames"] == 24
    back = profile_from_dict(v2_doc, "mem")
    assert back.calibration == CALIBRATION and back.compute_scale == {"dit": 1.25, "decoder": 0.8}
    assert profile_to_dict(back) == v2_doc
    saved = load_profile(save_profile(back, tmp_path / "p2.json"))
    assert saved == back


def test_one_slowdown_alone_is_written_and_read(v1):
    profile = _measured(v1, copy_slowdown=1.2, compute_slowdown=0.0)
    doc = profile_to_dict(profile)
    assert doc["schema_version"] == 2 and "compute_slowdown" not in doc
    assert profile_from_dict(doc, "mem") == profile


def test_a_calibration_note_may_be_left_out(v2_doc):
    del v2_doc["calibration"]["note"]
    assert profile_from_dict(v2_doc, "mem").calibration.note == ""


def test_fingerprint_counts_slowdowns_and_scale_but_not_the_calibration_record(v1):
    measured = _measured(v1)
    assert measured.fingerprint() != v1.fingerprint()
    scaled = dataclasses.replace(v1, compute_scale={"dit": 1.1})
    assert scaled.fingerprint() != v1.fingerprint()
    recorded = dataclasses.replace(scaled, calibration=CALIBRATION)
    assert recorded.fingerprint() == scaled.fingerprint()
    provenance_only = dataclasses.replace(v1, provenance={**v1.provenance, "copy_slowdown": v1.provenance["link"]})
    assert provenance_only.fingerprint() == v1.fingerprint()


def _set(d, value, *keys):
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


def _drop(d, *keys):
    for k in keys[:-1]:
        d = d[k]
    del d[keys[-1]]


BAD = {
    "slowdown below 1": (lambda d: _set(d, 0.5, "copy_slowdown"), "copy_slowdown", "[1, 10]"),
    "slowdown above 10": (lambda d: _set(d, 11.0, "compute_slowdown"), "compute_slowdown", "[1, 10]"),
    "negative slowdown": (lambda d: _set(d, -1, "copy_slowdown"), "copy_slowdown", "-1"),
    "slowdown as text": (lambda d: _set(d, "1.2x", "copy_slowdown"), "copy_slowdown", "'1.2x'"),
    "slowdown without provenance": (lambda d: _drop(d, "provenance", "copy_slowdown"), "provenance.copy_slowdown",
                                    "missing"),
    "zero scale": (lambda d: _set(d, 0, "compute_scale", "dit"), "compute_scale.dit", "positive"),
    "huge scale": (lambda d: _set(d, 101.0, "compute_scale", "dit"), "compute_scale.dit", "at most 100"),
    "scale not an object": (lambda d: _set(d, [1.0], "compute_scale"), "compute_scale", "JSON object"),
    "scale of no component": (lambda d: _set(d, 1.0, "compute_scale", ""), "compute_scale", "empty component"),
    "calibration frames": (lambda d: _set(d, 0, "calibration", "frames"), "calibration.frames", "0"),
    "calibration frames as text": (lambda d: _set(d, "24", "calibration", "frames"), "calibration.frames",
                                   "whole number"),
    "calibration model": (lambda d: _set(d, "", "calibration", "model"), "calibration.model", "non-empty"),
    "calibration missing": (lambda d: _drop(d, "calibration", "base_fingerprint"),
                            "calibration.base_fingerprint", "missing"),
    "calibration unknown key": (lambda d: _set(d, 1, "calibration", "seed"), "calibration.seed", "not known"),
    "calibration not an object": (lambda d: _set(d, "yes", "calibration"), "calibration", "JSON object"),
    "new field in a version 1 file": (lambda d: _set(d, 1, "schema_version"), "copy_slowdown", "schema_version 2"),
    "unknown schema version": (lambda d: _set(d, 3, "schema_version"), "schema_version", "1 or 2"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_new_fields_name_file_field_and_value(tmp_path, v2_doc, case):
    mutate, field, words = BAD[case]
    bad = copy.deepcopy(v2_doc)
    mutate(bad)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ResidencyError) as e:
        load_profile(path)
    assert "bad.json" in e.value.message
    assert f"'{field}'" in e.value.message
    assert words in e.value.message
    assert e.value.hint


def test_a_scale_that_is_not_finite_is_refused(v2_doc):  # a JSON file cannot hold one: the reader refuses it
    v2_doc["compute_scale"]["dit"] = float("nan")
    with pytest.raises(ResidencyError, match=r"'compute_scale.dit' = nan: expected a finite number"):
        profile_from_dict(v2_doc, "mem")


def test_calibrated_is_a_provenance_kind(v2_doc):
    v2_doc["provenance"]["copy_slowdown"] = {"kind": "calibrated", "source": "residency calibrate", "derating": ""}
    assert profile_from_dict(v2_doc, "mem").provenance["copy_slowdown"].kind == "calibrated"


# ---------------------------------------------------------------- the engine
def _pair(copy_s: float, compute_s: float, next_compute_s: float) -> list[Job]:
    """A resident call computing while the next call's copy runs: both start at 0."""
    return [Job("a", 1, "denoise", compute_s),
            Job("b", 1, "denoise", next_compute_s, copy_s=copy_s, uses_slot=True)]


def test_copy_slowed_more_ends_first_and_compute_finishes_at_full_rate():
    jobs = _pair(copy_s=1.0, compute_s=2.0, next_compute_s=0.5)
    run(jobs, slots=1, copy_slowdown=1.5, compute_slowdown=1.2)
    # copy: 1.0 × 1.5 = 1.5 s beside compute; compute did 1.5 / 1.2 = 1.25 s of its 2, the other 0.75 s alone
    assert jobs[1].copy_start == 0.0 and jobs[1].copy_end == pytest.approx(1.5, abs=1e-12)
    assert jobs[0].end == pytest.approx(2.25, abs=1e-12)
    assert (jobs[1].start, jobs[1].end) == (jobs[0].end, pytest.approx(2.75, abs=1e-12))


def test_compute_slowed_more_ends_first_and_the_copy_finishes_at_full_rate():
    jobs = _pair(copy_s=2.0, compute_s=0.5, next_compute_s=0.25)
    run(jobs, slots=1, copy_slowdown=1.1, compute_slowdown=3.0)
    # compute: 0.5 × 3 = 1.5 s beside the copy; the copy did 1.5 / 1.1 of its 2 s, the rest alone
    assert jobs[0].end == pytest.approx(1.5, abs=1e-12)
    assert jobs[1].copy_end == pytest.approx(1.5 + 2.0 - 1.5 / 1.1, abs=1e-12)
    assert jobs[1].start == jobs[1].copy_end
    assert jobs[1].end == pytest.approx(jobs[1].copy_end + 0.25, abs=1e-12)


def test_equal_factors_reproduce_the_measured_overlap():
    o, c, k = 0.3, 1.0, 2.0
    jobs = _pair(copy_s=c, compute_s=k, next_compute_s=0.0)
    run(jobs, slots=1, copy_slowdown=2 - o, compute_slowdown=2 - o)
    assert jobs[0].end == pytest.approx(max(c, k) + (1 - o) * min(c, k), abs=1e-12)


# ---------------------------------------------------------------- the frame-time floor
def test_floor_coefficients_of_the_symmetric_model_are_one_minus_the_overlap():
    assert interference_coefficients(flat_profile(overlap=0.3)) == (1.0 - 0.3, 1.0 - 0.3)


def test_floor_coefficients_per_engine_match_the_engine():
    profile = dataclasses.replace(flat_profile(), copy_slowdown=1.5, compute_slowdown=1.2)
    a_k, a_c = interference_coefficients(profile)
    assert (a_k, a_c) == (pytest.approx(0.25), pytest.approx(0.4))  # 1.5·(1 − 1/1.2), 1.2·(1 − 1/1.5)
    jobs = _pair(copy_s=1.0, compute_s=2.0, next_compute_s=0.0)
    run(jobs, slots=1, copy_slowdown=1.5, compute_slowdown=1.2)
    assert jobs[0].end == pytest.approx(max(2.0 + a_k * 1.0, 1.0 + a_c * 2.0))  # the floor is tight for one pair


def test_floor_is_the_serial_sum_when_both_at_once_is_slower_than_in_turn():
    profile = dataclasses.replace(flat_profile(), copy_slowdown=3.0, compute_slowdown=3.0)
    assert interference_coefficients(profile) == (1.0, 1.0)


@pytest.mark.parametrize("factors", [(1.5, 1.2), (1.05, 2.5), (3.0, 3.0), (1.0, 1.0)])
def test_no_plan_beats_the_floor_with_asymmetric_interference(factors):
    profile = dataclasses.replace(flat_profile(overlap=0.5), copy_slowdown=factors[0], compute_slowdown=factors[1])
    work = chain_workload(n=4)
    for placements in ({}, {"dit.blocks.1": "streamed"}, {f"dit.blocks.{i}": "streamed" for i in range(4)}):
        for depth in (1, 2):
            sim = simulate(work, make_plan(work, profile, placements, depth=depth), profile)
            assert sim.prediction.lower_bound_ms <= sim.prediction.frame_ms * (1 + 1e-9)


def test_a_version_1_profile_simulates_as_the_symmetric_model(v1):
    work = chain_workload(n=4)
    explicit = dataclasses.replace(v1, copy_slowdown=v1.copy_slowdown_factor(),
                                   compute_slowdown=v1.compute_slowdown_factor())
    for placements in ({}, {f"dit.blocks.{i}": "streamed" for i in range(4)}):
        old = simulate(work, make_plan(work, v1, placements), v1).prediction
        new = simulate(work, make_plan(work, explicit, placements), explicit).prediction
        assert (old.frame_ms, old.stall_ms, old.first_frame_ms) == (new.frame_ms, new.stall_ms, new.first_frame_ms)
        assert old.lower_bound_ms == pytest.approx(new.lower_bound_ms, rel=1e-12)


# ---------------------------------------------------------------- calibrated compute scale
def _two_components() -> Workload:
    blocks = (linear_block("dit.blocks.0", 1024, 256), linear_block("vae.decoder.blocks.0", 1024, 256, "decoder"))
    phase = PhaseSpec("denoise", "latent_frame", (PassSpec(tuple(b.name for b in blocks)),))
    return Workload(name="two", blocks=blocks, phases=(phase,), steps=1, context_frames=0)


def test_compute_scale_scales_the_compute_of_its_component_only():
    work, base = _two_components(), flat_profile()
    scaled = dataclasses.replace(base, compute_scale={"dit": 2.0})
    plan = make_plan(work, base, {b.name: "streamed" for b in work.blocks}, fmt="Q8_0")
    for block in work.blocks:
        bp = plan.by_name[block.name]
        before = call_cost(block, bp, base, plan.execution, 0, False, plan.kv_dtype, 1)
        after = call_cost(block, bp, scaled, plan.execution, 0, False, plan.kv_dtype, 1)
        factor = 2.0 if block.component == "dit" else 1.0
        assert after.compute_s - after.dequant_s == pytest.approx(factor * (before.compute_s - before.dequant_s))
        assert (after.copy_s, after.copy_bytes, after.dequant_s) == (before.copy_s, before.copy_bytes,
                                                                       before.dequant_s)


def test_an_empty_compute_scale_predicts_bit_identically():
    work, base = _two_components(), flat_profile()
    named = dataclasses.replace(base, compute_scale={"encoder": 3.0})  # a component this workload lacks
    plan = make_plan(work, base, {"dit.blocks.0": "streamed"})
    assert simulate(work, plan, base).prediction == simulate(work, plan, named).prediction


# ---------------------------------------------------------------- the probe
def test_calls_during_a_window_are_those_wholly_inside_else_those_overlapping():
    calls = [(0.0, 1.0), (1.0, 2.0), (2.0, 3.5), (3.5, 4.0)]
    assert calls_during(calls, (0.5, 3.6)) == [1.0, 1.5]
    assert calls_during(calls, (1.2, 1.8)) == [1.0]


def test_slowdowns_are_median_ratios_clamped_to_one_and_ten():
    assert slowdowns([1.0, 2.0, 3.0], [3.0, 3.0, 3.0], [1.0], [1.5]) == (1.5, 1.5)
    assert slowdowns([2.0], [1.0], [1.0], [50.0]) == (1.0, 10.0)


def test_cpu_probe_gives_factors_of_at_least_one():
    from residency.device import measure_cpu

    schedule = dataclasses.replace(measure_cpu.QUICK, probe_job_s=0.02, probe_repeats=1)
    engine = measure_cpu.start_copy_engine()
    try:
        copy_slowdown, compute_slowdown = measure_cpu.measure_interference(engine, schedule)
    finally:
        engine.stop()
    assert 1.0 <= copy_slowdown <= 10.0 and 1.0 <= compute_slowdown <= 10.0


@pytest.mark.gpu
def test_gpu_probe_gives_factors_of_at_least_one():
    from residency.device import measure_cuda

    dev = torch.device("cuda", 0)
    schedule = dataclasses.replace(measure_cuda.QUICK, matmul_dim=512, overlap_copy_bytes=8 * 2**20,
                                   overlap_repeats=2)
    with torch.cuda.device(dev):
        copy_slowdown, compute_slowdown = measure_cuda.measure_interference(dev, torch.cuda.Stream(dev), schedule)
    assert 1.0 <= copy_slowdown <= 10.0 and 1.0 <= compute_slowdown <= 10.0
