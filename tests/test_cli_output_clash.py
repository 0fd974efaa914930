"""An output that names one of the command's inputs is refused before any work, the input left as it was (a plan
written over its own catalog file, a trace over the plan it ran, a plan over a model directory's config.json)."""

import shutil
from pathlib import Path

import pytest

from residency.cli import main

CATALOG = Path(__file__).resolve().parents[1] / "pipelines" / "catalog" / "tiny.json"


@pytest.fixture
def catalog_copy(tmp_path):
    path = tmp_path / "tiny-copy.json"
    shutil.copy(CATALOG, path)
    return path


def refused(capsys, *argv):
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert "which this command reads" in err and "hint: write the output to another file" in err
    return err


def test_a_plan_written_over_its_model_file_or_profile_is_refused(capsys, tmp_path, catalog_copy):
    before = catalog_copy.read_bytes()
    refused(capsys, "plan", catalog_copy, "--profile", "rtx-3060-12gb", "-o", catalog_copy)
    # the same file by another spelling of its path
    refused(capsys, "plan", catalog_copy, "--profile", "rtx-3060-12gb", "-o", tmp_path / "." / catalog_copy.name)
    profile = tmp_path / "mine.json"
    shutil.copy(Path(__file__).resolve().parents[1] / "profiles" / "rtx-3060-12gb.json", profile)
    err = refused(capsys, "plan", "tiny", "--profile", profile, "-o", profile)
    assert "--profile" in err
    assert catalog_copy.read_bytes() == before


def test_a_plan_written_over_a_file_of_the_model_directory_is_refused_and_beside_it_is_not(capsys, tmp_path):
    model_dir = tmp_path / "unet"
    model_dir.mkdir()
    config = model_dir / "config.json"
    config.write_text("{}")
    err = refused(capsys, "plan", model_dir, "--profile", "rx-7800-xt", "-o", config)
    assert "a file of the model" in err and config.read_text() == "{}"
    for _ in range(2):  # the plan it wrote there is not a file it reads: the second run was refused
        main(["plan", str(model_dir), "--profile", "rx-7800-xt", "-o", str(model_dir / "plan.json")])
        assert "which this command reads" not in capsys.readouterr().err


def test_a_config_that_is_a_link_into_a_snapshots_blobs_is_still_the_models(capsys, tmp_path):
    """The Hugging Face cache layout: snapshots/<rev>/config.json links to ../../blobs/<hash>, outside the directory."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    (blobs / "f00d").write_text("{}")
    (snapshot / "config.json").symlink_to(Path("../..") / "blobs" / "f00d")
    refused(capsys, "plan", snapshot, "--profile", "rx-7800-xt", "-o", snapshot / "config.json")
    assert (blobs / "f00d").read_text() == "{}"


def test_a_run_trace_written_over_its_plan_is_refused(capsys, tmp_path):
    plan = tmp_path / "p.json"
    assert main(["plan", "tiny", "--profile", "rtx-3060-12gb", "--exec-mode", "eager", "-o", str(plan)]) == 0
    before = plan.read_bytes()
    capsys.readouterr()
    refused(capsys, "run", "tiny", "--plan", plan, "-o", tmp_path / "a.gif", "--trace", plan)
    assert plan.read_bytes() == before and not (tmp_path / "a.gif").exists()


def test_an_output_over_a_file_residency_reads_by_name_or_on_its_own_is_refused(capsys, tmp_path, monkeypatch):
    """`plan tiny --profile rx-7800-xt -o profiles/rx-7800-xt.json` replaced the shipped profile with the plan (exit 0;
    every later `--profile rx-7800-xt` failed), and `plan tiny -o <cache>/profile-cpu-mN.json` the machine's profile it
    had just read: inputs named by name, or by nothing, and not caught as paths."""
    from residency.device.auto_profile import cache_dir, cached_profile_path

    root = Path(__file__).resolve().parents[1]
    shipped, entry = root / "profiles" / "rx-7800-xt.json", root / "pipelines" / "catalog" / "tiny.json"
    kept = {p: p.read_bytes() for p in (shipped, entry)}
    try:
        for out, said in ((shipped, "the shipped profile rx-7800-xt"), (entry, "the catalog entry tiny")):
            code = main(["plan", "tiny", "--profile", "rx-7800-xt", "-o", str(out)])
            err = capsys.readouterr().err
            assert code == 2 and said in err and "hint: write the output to another file" in err
    finally:
        for p, data in kept.items():
            if p.read_bytes() != data:
                p.write_bytes(data)
    assert all(p.read_bytes() == data for p, data in kept.items())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = cached_profile_path("cpu")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(kept[shipped])
    code = main(["plan", "tiny", "--profile", "rx-7800-xt", "-o", str(cached)])
    assert code == 2 and "a file of residency's cache" in capsys.readouterr().err
    assert cached.read_bytes() == kept[shipped] and cache_dir() == tmp_path / "residency"
    # beside them, a new file is fine
    code = main(["plan", "tiny", "--profile", "rx-7800-xt", "-o", str(tmp_path / "plan.json")])
    assert code == 0, capsys.readouterr().err


def test_profile_may_write_over_the_cached_machine_profile(tmp_path, monkeypatch):
    """`residency profile -o <cache>/profile-cpu-mN.json` puts a full measurement where residency caches the quick one:
    deliberate, where a plan or a trace written there is not."""
    from residency.commands.output_clash import _owned
    from residency.device.auto_profile import cached_profile_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = cached_profile_path("cpu")
    cached.parent.mkdir(parents=True)
    cached.write_text("{}")
    assert _owned(cached, "profile") is None
    assert "residency's cache" in _owned(cached, "plan") and "residency's cache" in _owned(cached, "run")


def test_no_output_goes_into_the_calibration_cache_and_profile_writes_only_the_machines_file_there(tmp_path,
                                                                                                   monkeypatch):
    # a plan written as <cache>/calibrated/new.json was read (and skipped with a note) by every later run, and
    # `profiles --remove-calibrated` would delete it; `profile -o` overwrote an older method's cache file
    from residency.commands.output_clash import _owned
    from residency.device.auto_profile import cache_dir, cached_profile_path
    from residency.device.calibrated import calibrated_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    new = calibrated_dir() / "new.json"  # not there yet
    for command in ("plan", "profile", "run"):
        assert "calibration cache" in _owned(new, command)
    older = cache_dir() / "profile-cpu-m1.json"
    assert "writes only this machine's cached profile" in _owned(older, "profile")
    assert _owned(cached_profile_path("cpu"), "profile") is None and _owned(tmp_path / "p.json", "profile") is None


def test_an_output_that_is_a_link_is_written_where_it_points_and_stays_a_link(capsys, tmp_path):
    """The rename replaced the link itself by a file: a plan shared by linking it into several places stopped
    being shared, with nothing said."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "plan.json").write_text("old")
    link = tmp_path / "plan.json"
    link.symlink_to(shared / "plan.json")
    assert main(["plan", "tiny", "--profile", "rx-7800-xt", "-o", str(link)]) == 0, capsys.readouterr().err
    assert link.is_symlink() and (shared / "plan.json").read_text().startswith("{")
    assert sorted(p.name for p in shared.iterdir()) == ["plan.json"]  # no temp file left beside the target


def test_an_output_linking_to_a_file_of_the_model_is_refused_by_its_targets_name(capsys, tmp_path):
    """plan.json linking to the model directory's model.safetensors: judged by the link's own name it was no file
    of the model, and the plan replaced the weights (the link is written where it points)."""
    model_dir = tmp_path / "unet"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"weights")
    link = tmp_path / "plan.json"
    link.symlink_to(weights)
    err = refused(capsys, "plan", model_dir, "--profile", "rx-7800-xt", "-o", link)
    assert "a file of the model" in err and weights.read_bytes() == b"weights"
