"""DeviceProfile JSON: round trip, shipped profiles, and one clear error per kind of bad file."""

from __future__ import annotations

import copy
import json

import pytest

from profiles import profiles_dir, shipped_profile_paths
from residency.device import (
    Curve,
    load_profile,
    profile_from_dict,
    profile_to_dict,
    resolve_profile,
    save_profile,
    shipped_profile_names,
)
from residency.errors import ResidencyError


@pytest.fixture
def doc() -> dict:
    return profile_to_dict(load_profile("rx-7800-xt"))


def _load_doc(tmp_path, doc, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return load_profile(path)


def test_save_then_load_gives_the_same_profile(tmp_path):
    profile = load_profile("rtx-4060-ti-16gb")
    path = save_profile(profile, tmp_path / "p.json")
    again = load_profile(path)
    assert again == profile
    assert again.fingerprint() == profile.fingerprint()


def test_dict_round_trip_keeps_curves_and_spread():
    profile = load_profile("rtx-4090")
    doc = profile_to_dict(profile)
    doc["link"]["h2d_pinned"]["spread"] = [0.1] * len(doc["link"]["h2d_pinned"]["gbps"])
    back = profile_from_dict(doc, "mem")
    assert back.link["h2d_pinned"].spread == (0.1,) * len(back.link["h2d_pinned"].x)
    assert profile_to_dict(back) == doc


def test_json_names_carry_units(doc):
    assert {"sizes_bytes", "gbps", "spread"} == set(doc["link"]["h2d_pinned"])
    assert {"rows", "tflops", "spread"} == set(doc["matmul_tflops"]["bf16"])
    assert doc["schema_version"] == 2  # the shipped profiles carry the execution-mode figures (schema 2)


def test_every_shipped_profile_loads_from_profiles_dir():
    paths = shipped_profile_paths()
    assert {p.stem for p in paths} >= {"rx-7800-xt", "rx-7900-xtx", "rx-9070-xt", "rtx-5090", "rtx-4090",
                                        "rtx-4060-ti-16gb", "rtx-3060-12gb"}
    for path in paths:
        assert path.parent == profiles_dir()
        profile = load_profile(path.stem)
        assert profile.memory_usable_bytes < profile.memory_total_bytes
        assert all(p.kind == "datasheet" for p in profile.provenance.values())


def test_unknown_profile_name_lists_the_shipped_ones():
    with pytest.raises(ResidencyError) as e:
        load_profile("rtx-9999")
    assert "rtx-9999" in e.value.message
    assert all(name in e.value.hint for name in shipped_profile_names())


def test_missing_profile_path_says_no_such_file(tmp_path):
    with pytest.raises(ResidencyError, match="no such profile file"):
        load_profile(tmp_path / "absent.json")


def test_resolve_profile_accepts_name_path_or_profile(tmp_path):
    profile = resolve_profile("rx-9070-xt")
    assert resolve_profile(profile) is profile
    assert resolve_profile(str(save_profile(profile, tmp_path / "x.json"))) == profile


def _drop(d, *keys):
    for k in keys[:-1]:
        d = d[k]
    del d[keys[-1]]


def _set(d, value, *keys):
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


BAD = {
    "missing field": (lambda d: _drop(d, "device_memory_gbps"), "device_memory_gbps", "missing"),
    "missing curve": (lambda d: _drop(d, "link", "d2h_pageable"), "link.d2h_pageable", "missing"),
    "zero rate": (lambda d: _set(d, 0, "link", "h2d_pinned", "gbps", 2), "link.h2d_pinned.gbps[2]", "positive"),
    "escape in the name": (lambda d: _set(d, "\x1b[31mRED\x1b[0m", "name"), "name", "control character"),
    "newline in the vendor": (lambda d: _set(d, "AMD\nline2", "vendor"), "vendor", "control character"),
    "empty name": (lambda d: _set(d, "", "name"), "name", "non-empty"),
    # a 100,000-character name took over a minute to render in a plan's title
    "name past its bound": (lambda d: _set(d, "x" * 257, "name"), "name", "257 characters, more than the 256"),
    "absurdly slow link": (lambda d: _set(d, 1e-300, "link", "h2d_pinned", "gbps", 2), "link.h2d_pinned.gbps[2]",
                           "below any real device's rate"),
    "absurdly slow memory": (lambda d: _set(d, 1e-9, "device_memory_gbps"), "device_memory_gbps", "at least 0.001"),
    "absurdly slow dequant": (lambda d: _set(d, 1e-12, "dequant_gweights_per_s", "Q4_K"),
                              "dequant_gweights_per_s.Q4_K", "below any real device's rate"),
    "negative size": (lambda d: _set(d, -5, "memory_total_bytes"), "memory_total_bytes", "positive"),
    # figures in another unit than the field's, far above any device: planned as given, with nothing said
    "memory in GiB": (lambda d: _set(d, 16, "memory_total_bytes"), "memory_total_bytes", "below any device's memory"),
    "TFLOP/s in FLOP/s": (lambda d: _set(d, 3.7e13, "matmul_tflops", "bf16", "tflops", 0),
                          "matmul_tflops.bf16.tflops[0]", "above any real device's rate"),
    "link in MB/s": (lambda d: _set(d, 25_000.0, "link", "h2d_pinned", "gbps", 2), "link.h2d_pinned.gbps[2]",
                     "above any host link"),
    "reserve beyond total": (lambda d: _set(d, 2 * d["memory_total_bytes"], "memory_reserve_bytes"),
                             "memory_reserve_bytes", "usable + reserve ≤ total"),
    "zero dequant": (lambda d: _set(d, 0.0, "dequant_gweights_per_s", "Q4_K"), "dequant_gweights_per_s.Q4_K",
                     "positive"),
    "wrong unit key": (lambda d: d.update(device_memory_mbps=d.pop("device_memory_gbps") * 1e3),
                       "device_memory_mbps", "GB/s"),
    # a field beside the one it would be renamed to is not a misnamed unit: renaming it would overwrite that one
    "unknown field beside its stem": (lambda d: d.update(device_memory_mbps=1.0), "device_memory_mbps",
                                      "'device_memory_gbps' is given beside it"),
    "unit in a string": (lambda d: _set(d, "25 GB/s", "device_memory_gbps"), "device_memory_gbps",
                         "expected a number in GB/s"),
    "schema version": (lambda d: _set(d, 3, "schema_version"), "schema_version", "3"),
    "backend": (lambda d: _set(d, "metal", "backend"), "backend", "metal"),
    "unsorted x": (lambda d: _set(d, [4096, 16, 64, 256, 512], "matmul_tflops", "fp16", "rows"),
                   "matmul_tflops.fp16.rows", "increasing"),
    "lengths": (lambda d: d["link"]["h2d_pinned"]["gbps"].pop(), "link.h2d_pinned", "equal length"),
    "overlap above 1": (lambda d: _set(d, 1.5, "copy_compute_overlap"), "copy_compute_overlap", "[0, 1]"),
    "overlap below 0": (lambda d: _set(d, -0.1, "copy_compute_overlap"), "copy_compute_overlap", "-0.1"),
    "no provenance": (lambda d: _drop(d, "provenance", "matmul_tflops"), "provenance.matmul_tflops", "missing"),
    "bad provenance kind": (lambda d: _set(d, "guessed", "provenance", "link", "kind"), "provenance.link.kind",
                            "guessed"),
    "unknown format": (lambda d: _set(d, 1.0, "dequant_gweights_per_s", "Q9_9"), "dequant_gweights_per_s.Q9_9",
                       "not known"),
    "date in words": (lambda d: _set(d, "yesterday", "date"), "date", "ISO date"),
    "date past the calendar": (lambda d: _set(d, "2999-13-45", "date"), "date", "2999-13-45"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_field_names_file_field_and_problem(tmp_path, doc, case):
    mutate, field, words = BAD[case]
    bad = copy.deepcopy(doc)
    mutate(bad)
    with pytest.raises(ResidencyError) as e:
        _load_doc(tmp_path, bad)
    assert "bad.json" in e.value.message
    assert f"'{field}'" in e.value.message
    assert words in e.value.message
    assert e.value.hint


def test_non_json_file_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "garbage.json"
    path.write_text("{not json")
    with pytest.raises(ResidencyError, match=r"garbage\.json: not valid JSON"):
        load_profile(path)


def test_unreadable_file_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ResidencyError, match=r"binary\.json: cannot read"):
        load_profile(path)


def test_save_into_missing_directory_fails_without_a_file(tmp_path):
    target = tmp_path / "nope" / "p.json"
    with pytest.raises(ResidencyError, match="does not exist"):
        save_profile(load_profile("rtx-4090"), target)
    assert not target.parent.exists()


def test_save_replaces_an_existing_file_whole(tmp_path):
    target = tmp_path / "p.json"
    target.write_text("old")
    save_profile(load_profile("rtx-4090"), target)
    assert load_profile(target).name == "GeForce RTX 4090"
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temp file left behind


def test_curve_interpolates_in_log_size_and_is_flat_beyond():
    c = Curve((2.0**16, 2.0**26), (1.0, 11.0))
    assert c.at(2.0**21) == pytest.approx(6.0)  # halfway in log size
    assert c.at(1.0) == 1.0 and c.at(2.0**40) == 11.0


def test_profile_h2d_time_uses_the_curve_at_the_transfer_size():
    p = load_profile("rtx-4090")
    small, large = p.h2d_gbps(64 * 2**10), p.h2d_gbps(256 * 2**20)
    assert small < large
    assert p.h2d_s(2**20) == pytest.approx(2**20 / (p.link["h2d_pinned"].at(2**20) * 1e9))


def _refined(doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    doc.update(matmul_weight_dim=1024, matmul_small_weight_dim=256,
               elementwise_gelems_per_s={"tensor_elements": [4096, 1048576], "gelems_per_s": [7.0, 2.0], "spread": []},
               matmul_small_tflops={"fp32": {"rows": [1, 16], "tflops": [0.004, 0.035], "spread": [0.1, 0.05]}})
    for key in ("matmul_small_tflops", "elementwise_gelems_per_s"):
        doc["provenance"][key] = {"kind": "measured", "source": "test", "derating": ""}
    return doc


def test_measured_refinements_round_trip(doc):
    refined = profile_from_dict(_refined(doc), "mem")
    assert refined.matmul_small_tflops["fp32"].y == (0.004, 0.035)
    assert refined.elementwise_gelems_per_s.at(4096) == 7.0
    assert profile_to_dict(refined) == _refined(doc)
    assert "matmul_small_tflops" not in doc  # datasheet profiles carry none: their files stay as they were


@pytest.mark.parametrize(("mutate", "field", "words"), [
    (lambda d: d.update(matmul_small_weight_dim=2048), "matmul_small_weight_dim", "below matmul_weight_dim"),
    (lambda d: d.update(matmul_weight_dim=0), "matmul_weight_dim", "= 0: with matmul_small_tflops"),  # the one wrong
    (lambda d: d["provenance"].pop("elementwise_gelems_per_s"), "provenance.elementwise_gelems_per_s", "missing"),
    (lambda d: d.update(elementwise_gelems_per_s="fast"), "elementwise_gelems_per_s", "expected a JSON object"),
    (lambda d: d["elementwise_gelems_per_s"].update(gelems_per_s=[7.0, 0.0]), "elementwise_gelems_per_s.gelems_per_s[1]",
     "positive"),
    (lambda d: d["matmul_small_tflops"].update(fp64=d["matmul_small_tflops"]["fp32"]), "matmul_small_tflops.fp64",
     "not known"),
])
def test_bad_refinement_names_the_field(tmp_path, doc, mutate, field, words):
    bad = _refined(doc)
    mutate(bad)
    with pytest.raises(ResidencyError) as e:
        _load_doc(tmp_path, bad)
    assert f"'{field}'" in e.value.message and words in e.value.message


def test_fingerprint_ignores_refinements_left_unset_and_sees_set_ones():
    from dataclasses import replace

    profile = load_profile("rtx-4090")
    assert replace(profile, matmul_small_tflops={}).fingerprint() == profile.fingerprint()
    assert replace(profile, elementwise_gelems_per_s=Curve((4096.0,), (1.0,))).fingerprint() != profile.fingerprint()


def test_small_weight_dim_round_trips_without_a_curve(doc):
    doc = copy.deepcopy(doc)
    doc.update(matmul_weight_dim=1024, matmul_small_weight_dim=256)
    again = profile_from_dict(profile_to_dict(profile_from_dict(doc, "mem")), "mem")
    assert again == profile_from_dict(doc, "mem")
