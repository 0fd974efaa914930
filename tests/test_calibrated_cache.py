"""The cache of calibrated profiles (residency.device.calibrated): keyed by base profile and workload, stale and
unreadable files skipped and kept, per-engine rates transferred to another model without its compute scales."""

from __future__ import annotations

import dataclasses

import pytest

from residency.device import find_calibrated, list_calibrated, profile_for, remove_calibrated, save_calibrated
from residency.device.auto_profile import cached_profile_path
from residency.device.calibrated import base_name, calibrated_dir, calibrated_profile
from residency.device.profile import Calibration, Provenance
from residency.device.profile_io import load_profile, save_profile
from residency.errors import ResidencyError, UsageError

BASE = dataclasses.replace(load_profile("rx-7800-xt"), name="test cpu")  # one that saves and reads back


def calibrated(base=BASE, workload="w-one", model="one", scale=1.5, frames=8, date="2026-12-01"):
    """`base` as a calibration of `model` would leave it: a compute scale, a calibration record."""
    record = Calibration(base.fingerprint(), workload, model, frames, date, f"calibrated from {frames} frames")
    how = Provenance("calibrated", record.note)
    return dataclasses.replace(base, compute_scale={"dit": scale}, copy_slowdown=1.4, calibration=record,
                               provenance={**base.provenance, "compute_scale": how, "copy_slowdown": how})


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "residency" / "calibrated"


def test_a_saved_calibration_is_found_for_its_base_and_workload(cache):
    path = save_calibrated(calibrated())
    assert path.parent == cache == calibrated_dir()
    found = find_calibrated(BASE, "w-one", say=pytest.fail)
    assert found.name == "test cpu (calibrated)" and base_name(found) == "test cpu"
    assert found.compute_scale == {"dit": 1.5} and found.copy_slowdown == 1.4
    assert found.calibration.model == "one" and found.calibration.frames == 8
    assert save_calibrated(calibrated(scale=2.0)) == path  # a new calibration replaces the old one
    assert find_calibrated(BASE, "w-one", say=pytest.fail).compute_scale == {"dit": 2.0}


def test_a_calibration_of_a_calibrated_profile_keeps_the_root_name():
    first = save_calibrated(calibrated())
    found = find_calibrated(BASE, "w-one", say=pytest.fail)  # named "test cpu (calibrated)"
    assert save_calibrated(dataclasses.replace(found, compute_scale={"dit": 1.1})) == first
    assert [(base_name(p), p.name) for _, p in list_calibrated()] == [("test cpu", "test cpu (calibrated)")]


def test_another_workload_gets_the_engine_rates_without_the_compute_scales():
    save_calibrated(calibrated(workload="w-one", model="one", date="2026-11-01"))
    save_calibrated(calibrated(workload="w-two", model="two", date="2026-12-01"))
    said = []
    other = find_calibrated(BASE, "w-three", say=said.append)
    assert other.compute_scale == {} and other.copy_slowdown == 1.4
    assert other.calibration.model == "two"  # the newest
    assert said == ["using the per-engine rates calibrated on two; its compute scales are left out (they belong "
                    "to that model)"]
    assert find_calibrated(dataclasses.replace(BASE, name="other machine"), "w-one", say=pytest.fail) is None


def test_a_calibration_of_a_changed_base_is_deleted_with_a_note(cache):
    path = save_calibrated(calibrated())
    remeasured = dataclasses.replace(BASE, launch_overhead_us=7.0)
    said = []
    assert find_calibrated(remeasured, "w-one", say=said.append) is None
    assert not path.exists()
    assert len(said) == 1 and "discarded" in said[0] and "changed since it was calibrated" in said[0]


@pytest.mark.parametrize("text", ["{ not json", '{"schema_version": 2}', "[]"])
def test_an_unreadable_file_is_skipped_kept_and_never_crashes(cache, text):
    cache.mkdir(parents=True)
    bad = cache / "broken--abc.json"
    bad.write_text(text)
    said = []
    assert find_calibrated(BASE, "w-one", say=said.append) is None
    assert bad.read_text() == text  # a hand edit's typo is the user's to fix, not ours to delete
    assert "skipped" in said[0] and "unreadable" in said[0] and "--remove-calibrated" in said[0]


def test_a_plain_profile_in_the_cache_is_not_a_calibration(cache):
    cache.mkdir(parents=True)
    save_profile(BASE, cache / "plain--x.json")
    said = []
    assert find_calibrated(BASE, "x", say=said.append) is None
    assert "no calibration record" in said[0]
    with pytest.raises(ResidencyError, match="not calibrated"):
        save_calibrated(BASE)


def test_list_and_remove(cache):
    assert list_calibrated() == [] and remove_calibrated() == 0
    save_calibrated(calibrated(workload="w-one"))
    save_calibrated(calibrated(workload="w-two"))
    (cache / "junk--x.json").write_text("{")
    assert [p.calibration.workload_fingerprint for _, p in list_calibrated()] == ["w-one", "w-two"]
    assert remove_calibrated() == 3
    assert list_calibrated() == []


def test_remove_deletes_nothing_when_one_entry_is_not_a_file(cache):
    # it deleted the files before a directory named *.json, then failed with a hint on permissions
    save_calibrated(calibrated(workload="w-one"))
    (cache / "dir.json").mkdir()
    with pytest.raises(ResidencyError, match=r"dir\.json: not a calibrated profile \(a directory, not a file\); "
                                             "nothing was deleted") as e:
        remove_calibrated()
    assert "move it out of" in e.value.hint
    assert [p.calibration.workload_fingerprint for _, p in list_calibrated()] == ["w-one"]


def test_calibrated_resolves_through_the_cached_machine_profile(tmp_path):
    with pytest.raises(UsageError, match="not been measured") as e:
        calibrated_profile("w-one", kind="cpu", model="tiny")
    assert e.value.exit_code == 2 and e.value.hint == "run `residency run tiny -o out.gif --frames 18 --calibrate` first"
    path = cached_profile_path("cpu")
    path.parent.mkdir(parents=True)
    save_profile(BASE, path)
    with pytest.raises(UsageError, match="no calibrated profile of 'test cpu'"):
        profile_for("calibrated", "w-one", kind="cpu")
    save_calibrated(calibrated())
    assert profile_for("calibrated", "w-one", kind="cpu").compute_scale == {"dit": 1.5}
    assert profile_for("rx-7800-xt", "w-one") == load_profile("rx-7800-xt")
    assert profile_for(BASE, "w-one") is BASE  # anything else resolves as --profile always did


def test_an_unreadable_calibrated_profile_is_a_bad_file_not_a_missing_calibration(capsys):
    # it read "no calibrated profile of …" (exit 2, "run --calibrate first") after a line saying the file was skipped
    path = cached_profile_path("cpu")
    path.parent.mkdir(parents=True)
    save_profile(BASE, path)
    saved = save_calibrated(calibrated())
    saved.write_text(saved.read_text()[:200])  # cut short
    with pytest.raises(ResidencyError, match="no readable calibrated profile of 'test cpu'") as e:
        profile_for("calibrated", "w-one", kind="cpu")
    assert e.value.exit_code == 1 and str(saved) in e.value.message and "--remove-calibrated" in e.value.hint
    assert capsys.readouterr().err == ""  # said once, in the error


def test_an_unreadable_calibration_of_another_base_leaves_the_missing_calibration_a_usage_error(capsys):
    path = cached_profile_path("cpu")
    path.parent.mkdir(parents=True)
    save_profile(BASE, path)
    other = save_calibrated(calibrated(base=dataclasses.replace(BASE, name="other gpu")))
    other.write_text("{")
    with pytest.raises(UsageError, match="no calibrated profile of 'test cpu'"):
        profile_for("calibrated", "w-one", kind="cpu")
    assert str(other) in capsys.readouterr().err  # still said, as a note


def test_remove_deletes_a_dangling_link_named_like_a_calibration(cache):
    save_calibrated(calibrated(workload="w-one"))
    (cache / "gone.json").symlink_to(cache / "nowhere.json")
    assert remove_calibrated() == 2 and not (cache / "gone.json").is_symlink()


def test_a_misspelt_calibrated_is_offered_where_the_cli_takes_it_and_not_by_the_library():
    from residency.device import resolve_profile
    from residency.device.calibrated import resolve_cli_profile

    with pytest.raises(UsageError, match=r"unknown profile 'Calibrated' \(did you mean calibrated\?\)"):
        resolve_cli_profile("Calibrated")
    with pytest.raises(UsageError) as e:
        resolve_profile("calibratedd")  # attach(profile=…) takes no "calibrated": not offered there
    assert "calibrated" not in e.value.message.replace("'calibratedd'", "")
