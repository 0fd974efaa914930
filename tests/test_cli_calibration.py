"""`run --calibrate`, `--profile calibrated`, `profiles --remove-calibrated` and `run --closed-loop` on tiny.

This machine's profile is a measured 2-core CPU profile (tests/data), seeded into a temporary cache: the fit
needs a profile of the right order (a GPU datasheet predicts tiny's CPU calls hundreds of times too fast, which
the fitter refuses as broken telemetry), and no test measures one.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from residency.cli import main
from residency.device import cached_profile_path, load_profile, read_profile, save_profile
from residency.device.calibrated import BASE_KEY, calibrated_dir

MEASURED = Path(__file__).parent / "data" / "measured-cpu-2-cores.json"
RUN = ["run", "tiny", "--image", "start.png", "--vram", "24MiB", "-o", "out.gif"]
SAVED = re.compile(r"calibrated profile saved to (\S+) \(from (\d+) frames\): prediction error before "
                   r"([+-]\d+\.\d) %, after ([+-]\d+\.\d) %")


@pytest.fixture()
def machine(tmp_path, monkeypatch):
    """A temporary cache holding this machine's (CPU) profile; measuring one fails the test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for where in ("residency.session_setup.device_kind", "residency.device.calibrated.device_kind"):
        monkeypatch.setattr(where, lambda: "cpu")  # the CPU backend and its profile, GPU or not

    def no_measuring(*args, **kwargs):
        raise AssertionError("a test measured a profile")

    monkeypatch.setattr("residency.device.measure_profile", no_measuring)
    # a fit missing its own frames is not saved (a loaded box's): judged in its own test, not by a busy CI box's luck
    monkeypatch.setattr("residency.session_setup.POOR_FIT_ERROR", float("inf"))
    cached_profile_path("cpu").parent.mkdir(parents=True)
    shutil.copy(MEASURED, cached_profile_path("cpu"))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "start.png")
    return load_profile(MEASURED)


def calibrate_tiny(capsys) -> tuple[Path, re.Match]:
    assert main([*RUN, "--frames", "5", "--calibrate"]) == 0
    out = capsys.readouterr().out
    found = SAVED.search(out)
    assert found, out
    assert re.search(r"the plan predicted \d+\.\d ms \([+-]\d+%\)", " ".join(out.split())), out  # CPU on CPU
    return Path(found.group(1)), found


def test_run_calibrate_saves_a_calibrated_profile_and_reports_both_errors(machine, capsys):
    path, line = calibrate_tiny(capsys)
    assert path.parent == calibrated_dir() and line.group(2) == "3"  # frames 3..5: two are the warm-up
    profile = read_profile(path)
    c = profile.calibration
    assert (c.model, c.frames, c.base_fingerprint) == ("tiny", 3, machine.fingerprint())
    assert "calibrated from 3 frames of tiny on" in c.note
    assert profile.name == f"{machine.name} (calibrated)" and profile.provenance[BASE_KEY].source == machine.name
    assert profile.compute_scale  # tiny's blocks were timed: a scale per component
    assert all(float(x) == float(x) for x in line.group(3, 4))  # both errors are numbers


def test_profile_calibrated_plans_with_it_and_another_model_gets_only_the_engine_rates(machine, capsys):
    path, _ = calibrate_tiny(capsys)
    calibrated = read_profile(path)
    assert main(["plan", "tiny", "--profile", "calibrated", "--compute-dtype", "fp32", "--json"]) in (0, 3)
    doc = json.loads(capsys.readouterr().out)
    assert (doc["profile"], doc["profile_fingerprint"]) == (calibrated.name, calibrated.fingerprint())
    assert main(["plan", "lucid-500m", "--profile", "calibrated", "--json"]) in (0, 3)
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    transferred = dataclasses.replace(calibrated, compute_scale={})
    assert (doc["profile"], doc["profile_fingerprint"]) == (calibrated.name, transferred.fingerprint())
    assert "compute scales are left out" in captured.err


def test_run_with_profile_calibrated_runs_its_plan(machine, capsys):
    path, _ = calibrate_tiny(capsys)
    assert main([*RUN, "--frames", "2", "--profile", "calibrated", "--trace", "trace.json"]) == 0
    trace = Path("trace.json").read_text()
    assert f"on {read_profile(path).name}" in trace  # the dashboard title names the plan's profile


def test_a_stale_calibration_is_discarded_with_a_note(machine, capsys):
    path, _ = calibrate_tiny(capsys)
    save_profile(dataclasses.replace(machine, launch_overhead_us=machine.launch_overhead_us + 1.0),
                 cached_profile_path("cpu"))  # the machine was re-measured
    assert main(["plan", "tiny", "--profile", "calibrated", "--compute-dtype", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "discarded the calibrated profile" in err and "changed since it was calibrated" in err
    assert "hint: run `residency run tiny --image start-0000.png -o out.gif --frames 18 --calibrate` first" in err
    assert not path.exists()


def test_profiles_lists_calibrated_ones_and_removes_them(machine, capsys):
    assert main(["profiles", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["calibrated"] == []
    path, _ = calibrate_tiny(capsys)
    assert main(["profiles", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["calibrated"]
    assert (entry["base"], entry["model"], entry["frames"], entry["path"]) == (machine.name, "tiny", 3, str(path))
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert "calibrated profiles (--profile calibrated" in out and "│ tiny" in out
    assert main(["profiles", "--remove-calibrated"]) == 0
    assert "removed 1 calibrated profile" in capsys.readouterr().out
    assert not path.exists()


def test_profile_calibrated_without_a_calibration_exits_2_with_the_hint(machine, capsys):
    assert main([*RUN, "--frames", "1", "--profile", "calibrated"]) == 2
    err = capsys.readouterr().err
    assert "error: no calibrated profile" in err and "hint: run `residency run tiny --image start.png -o out.gif" in err
    # the hint runs as given: with the --image of the command that needed it (it named start.png, whatever was given)
    shutil.copy("start.png", "my pic.png")
    assert main(["run", "tiny", "--image", "my pic.png", "-o", "out.gif", "--frames", "1", "--profile", "calibrated"]) == 2
    assert "run `residency run tiny --image 'my pic.png' -o out.gif --frames 18 --calibrate` first" in (
        capsys.readouterr().err)
    assert not Path("out.gif").exists()


def test_run_closed_loop_prints_the_loop_events_when_frames_miss(machine, capsys):
    # 1000 fps is 1 ms per latent frame: every frame misses; after the 2 warm-up frames and 4 misses in a row
    # the loop calibrates (printed at once) and re-plans on a thread (its decision comes at a later frame
    # boundary, if the run has one left by then: not asserted, it depends on the solver's time)
    assert main([*RUN, "--frames", "7", "--fps", "1000", "--closed-loop"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\[calibrated\] frame [67]: .*compute ×.* \(from 4 frames\)", out, re.M), out


@pytest.mark.parametrize("flag", ["--closed-loop", "--calibrate"])
def test_a_fixed_plan_is_neither_re_planned_nor_calibrated(machine, capsys, flag):
    Path("plan.json").write_text("{}")
    assert main([*RUN, "--plan", "plan.json", flag]) == 2
    err = capsys.readouterr().err
    assert "--plan" in err and "hint:" in err


@pytest.mark.parametrize("extra, message", [
    (["--frames", "4"], "--calibrate needs at least 5 latent frames (the first 2 are a warm-up, then 3 to fit); "
                        "this run has 4"),
    (["--frames", "5", "--profile", "rx-7800-xt"],
     "the plan's profile is Radeon RX 7800 XT, a GPU profile, not this CPU"),
])
def test_a_calibration_that_cannot_work_is_refused_before_the_rollout(machine, capsys, monkeypatch, extra, message):
    """Before planning, too: a named GPU profile was refused only after the plan was made and printed."""
    from residency.commands import run_cmd

    def no_planning(*a, **k):
        raise AssertionError("planned before refusing")

    monkeypatch.setattr(run_cmd, "make_plan", no_planning)
    assert main([*RUN, *extra, "--calibrate"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "hint:" in err
    assert not Path("out.gif").exists() and not calibrated_dir().exists()  # nothing rolled out, nothing cached


def test_too_few_frames_to_calibrate_are_refused_before_planning(machine, capsys, monkeypatch):
    """Planning takes seconds (a measured profile's more): it ran first, then the frame count was refused."""
    from residency.commands import run_cmd

    def no_planning(*a, **k):
        raise AssertionError("planned before refusing")

    monkeypatch.setattr(run_cmd, "make_plan", no_planning)
    assert main([*RUN, "--frames", "4", "--calibrate"]) == 2
    assert "--calibrate needs at least 5 latent frames" in " ".join(capsys.readouterr().err.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU profile is this machine's kind there")
def test_a_closed_loop_on_another_kind_of_devices_profile_is_refused_before_the_rollout(machine, capsys, monkeypatch):
    from residency.commands import run_cmd

    monkeypatch.setattr(run_cmd, "make_plan", lambda *a, **k: pytest.fail("planned before refusing"))
    assert main([*RUN, "--frames", "5", "--profile", "rx-7800-xt", "--closed-loop"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--closed-loop fits the plan's profile to this machine's timings; it is Radeon RX 7800 XT, a GPU " \
        "profile, not this CPU" in err and "hint:" in err
    assert not Path("out.gif").exists()


def test_a_shorter_calibration_keeps_the_cached_one_fitted_on_more_frames(machine, capsys):
    assert main([*RUN, "--frames", "6", "--calibrate"]) == 0  # 4 fitted
    path = Path(SAVED.search(capsys.readouterr().out).group(1))
    assert main([*RUN, "--frames", "5", "--calibrate"]) == 0  # 3 fitted: fewer, and under FULL_FIT_FRAMES
    out = " ".join(capsys.readouterr().out.split())
    assert "calibrated from 3 frames (prediction error before" in out and f"not saved: {path} keeps its " \
        "calibration from 4 frames of" in out
    assert read_profile(path).calibration.frames == 4
    assert main([*RUN, "--frames", "7", "--calibrate"]) == 0  # 5 fitted: more, so it replaces
    assert "calibrated profile saved to" in capsys.readouterr().out
    assert read_profile(path).calibration.frames == 5


def test_a_prediction_far_off_gets_the_hint_to_calibrate(machine, capsys, tmp_path):
    fast = dataclasses.replace(machine, compute_scale={c: 0.2 for c in ("encoder", "dit", "decoder", "vae")})
    save_profile(fast, tmp_path / "fast.json")  # predicts compute 5x faster than it runs
    assert main([*RUN, "--frames", "4", "--profile", str(tmp_path / "fast.json")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    # 4 frames are too few to calibrate: the hint says how many, and to calibrate this machine's profile
    assert "hint: the prediction is off by more than 20%: run it without --profile and with --frames 8 --calibrate" \
        in out
    save_profile(fast, cached_profile_path("cpu"))  # this machine's profile predicts 5x fast, and the run calibrates
    assert main([*RUN, "--frames", "5", "--calibrate"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(+" in out and "hint: the prediction is off" not in out  # far off, but calibrating already


def test_one_steady_frame_is_said_to_be_one_sample_and_gets_no_hint(machine, capsys, tmp_path):
    # a loaded moment on the one frame after the warm-up read "+135%" with the hint to calibrate; 4+ frames ran 44 ms
    fast = dataclasses.replace(machine, compute_scale={c: 0.2 for c in ("encoder", "dit", "decoder", "vae")})
    save_profile(fast, tmp_path / "fast.json")
    assert main([*RUN, "--frames", "3", "--profile", str(tmp_path / "fast.json")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "for the one steady latent frame (a single sample; --frames 7 or more for a median)" in out
    assert "hint:" not in out


def test_a_given_plan_far_off_gets_the_hint_to_calibrate_without_it_and_plan_again(machine, capsys, tmp_path):
    """A run of --plan that was 41% off said nothing: --calibrate is refused with --plan, so the hint says the way."""
    fast = dataclasses.replace(machine, compute_scale={c: 0.2 for c in ("encoder", "dit", "decoder", "vae")})
    save_profile(fast, tmp_path / "fast.json")
    assert main(["plan", "tiny", "--profile", str(tmp_path / "fast.json"), "--vram", "24MiB", "--exec-mode", "eager",
                 "-o", "fast-plan.json"]) in (0, 3)
    capsys.readouterr()
    assert main(["run", "tiny", "--image", "start.png", "-o", "out.gif", "--frames", "4", "--plan",
                 "fast-plan.json"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "hint: the prediction is off by more than 20%: run it once without --plan and with --frames 8 " \
           "--calibrate" in out and "residency plan tiny --profile calibrated … -o fast-plan.json" in out


def test_calibrating_a_profile_other_than_this_machines_is_refused_before_the_rollout(machine, capsys):
    """Saved under the same base name, it replaced the machine's calibration and was then discarded as of a changed
    base at its next use: one run lost a good calibration and kept none."""
    calibrate_tiny(capsys)
    Path("out.gif").unlink()
    kept = {p: p.read_bytes() for p in calibrated_dir().iterdir()}
    doc = json.loads(MEASURED.read_text())
    doc["launch_overhead_us"] = doc["launch_overhead_us"] * 2  # measured again: another profile of this machine
    Path("other.json").write_text(json.dumps(doc))
    assert main([*RUN, "--frames", "5", "--profile", "other.json", "--calibrate"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "other.json: it is not this machine's cached profile" in err and "hint:" in err
    assert not Path("out.gif").exists()
    assert {p: p.read_bytes() for p in calibrated_dir().iterdir()} == kept
    shutil.copy(cached_profile_path("cpu"), "same.json")  # this machine's profile at another path: it is
    assert main([*RUN, "--frames", "5", "--profile", "same.json", "--calibrate"]) == 0
    assert SAVED.search(capsys.readouterr().out)


def test_an_unwritable_calibration_cache_is_refused_before_the_rollout(machine, capsys):
    calibrated_dir().parent.mkdir(parents=True, exist_ok=True)
    calibrated_dir().write_text("a file where the cache's folder goes")
    assert main([*RUN, "--frames", "5", "--calibrate"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot write the calibration cache" in err and "XDG_CACHE_HOME" in err
    assert not Path("out.gif").exists()


def test_calibrating_before_this_machine_was_measured_says_so(machine, capsys):
    cached_profile_path("cpu").rename("measured.json")  # no machine profile in the cache: the file is not it
    assert main([*RUN, "--frames", "5", "--profile", "measured.json", "--calibrate"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "this machine's profile has not been measured yet" in err and "drop --profile" in err


def test_a_demo_on_another_profile_is_not_calibrated_over_the_machines(machine, capsys):
    calibrate_tiny(capsys)
    kept = {p: p.read_bytes() for p in calibrated_dir().iterdir()}
    doc = json.loads(MEASURED.read_text())
    doc["launch_overhead_us"] = doc["launch_overhead_us"] * 2
    Path("other.json").write_text(json.dumps(doc))
    assert main(["demo", "-o", "demo", "--frames", "6", "--once", "--profile", "other.json"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "not calibrated: the plan's profile is not what a calibration is cached for" in out
    assert {p: p.read_bytes() for p in calibrated_dir().iterdir()} == kept


def test_a_calibrated_file_given_for_another_model_plans_without_its_compute_scales(machine, capsys):
    path, _ = calibrate_tiny(capsys)
    assert read_profile(path).compute_scale  # tiny's blocks' scales
    assert main(["plan", "default", "--profile", str(path), "--vram", "24MiB"]) in (0, 3)
    err = " ".join(capsys.readouterr().err.split())
    assert "its compute scales belong to that model and are left out" in err


def test_profiles_names_this_machines_profile_or_says_it_is_not_measured(machine, capsys):
    assert main(["profiles", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["machine"]
    assert m["measured"] and m["device"] == machine.name and m["path"] == str(cached_profile_path("cpu"))
    assert main(["profiles"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"this machine (what plan and run use without --profile): {machine.name}, measured {machine.date}" in out
    cached_profile_path("cpu").unlink()
    assert main(["profiles"]) == 0
    assert "this machine: not measured yet" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("frames, hinted", [(4, False), (8, True)])
def test_a_prediction_25_percent_off_is_hinted_from_enough_steady_frames_only(frames, hinted):
    """From a median of 2 steady frames the hint fired on noise (5 of 11 identical 4-frame runs)."""
    import io

    from rich.console import Console

    from residency.commands.run_cmd import report_speed
    from residency.plan import Prediction
    from residency.telemetry import Recorder

    rec = Recorder(["a"], Prediction(frame_ms=40.0, first_frame_ms=40.0, stall_ms=0.0, copy_ms=0.0, compute_ms=40.0,
                                     link_bytes_per_frame=0, peak_bytes={}, lower_bound_ms=1.0, quality_loss=0.0))
    t = 1.0
    for n in range(frames + 1):
        rec.record(n, 0, t, t, t, t + 0.050, None, 0)  # 50 ms of work a frame: 25 % over the 40 predicted
        rec.end_frame(lambda marks: marks, 0, 0, t + 0.050)
        t += 0.050
    out = io.StringIO()
    report_speed(Console(file=out, width=300), rec.snapshot(()), calibrate_hint="calibrate")
    assert ("hint: the prediction is off by more than 20%: calibrate" in out.getvalue()) == hinted, out.getvalue()


def test_the_hint_to_calibrate_again_asks_for_enough_frames_to_replace_the_cached_fit():
    # "run again with --calibrate" after 8 frames fitted 6, fewer than the cached fit's 16: not saved, and the same
    # hint came back on every run
    import argparse

    from residency.commands.run_cmd import _calibrate_hint
    from residency.device.calibrated import FULL_FIT_FRAMES
    from residency.telemetry.calibration import WARMUP_FRAMES

    args = argparse.Namespace(calibrate=False, plan=None, profile="calibrated", model="tiny")
    assert f"--frames {WARMUP_FRAMES + FULL_FIT_FRAMES} --calibrate" in _calibrate_hint(args, 8)
    assert "--frames" not in _calibrate_hint(args, WARMUP_FRAMES + FULL_FIT_FRAMES)


def test_a_fit_that_misses_its_own_frames_is_not_saved_and_the_cache_keeps_what_it_had(machine, capsys, monkeypatch):
    # a loaded run's fit ("before -14.6 %, after +13.3 %") replaced a good calibration; the next run read +25 %
    from residency import session_setup

    path, _ = calibrate_tiny(capsys)
    kept = path.read_bytes()
    monkeypatch.setattr("residency.session_setup.POOR_FIT_ERROR", -1.0)  # every fit misses by more than this
    assert main([*RUN, "--frames", "5", "--calibrate"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "not saved: the fit does not predict the frames it was fitted on within" in out
    assert path.read_bytes() == kept
    monkeypatch.setattr("residency.session_setup.POOR_FIT_ERROR", 0.10)
    assert session_setup.fit_is_poor(-0.146, 0.133) and session_setup.fit_is_poor(0.0, -0.11)
    assert not session_setup.fit_is_poor(0.36, 0.031) and not session_setup.fit_is_poor(0.0, float("nan"))
