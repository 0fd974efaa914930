"""`residency demo` without a terminal: a plan that streams, the dashboard's final render, demo.gif and its trace."""

from __future__ import annotations

import shlex
import shutil

import pytest
import torch
from PIL import Image

from residency.cli import main
from residency.dashboard import read_trace
from residency.device import cached_profile_path
from residency.device.profile_io import profile_path


def test_demo_streams_some_blocks_and_writes_gif_and_trace(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "residency").mkdir(parents=True)
    shutil.copy(profile_path("rx-7800-xt"), cached_profile_path("cpu"))
    out_dir = tmp_path / "demo out"  # a space: the printed replay command quotes the path
    out_dir.mkdir()
    assert main(["demo", "--frames", "5", "-o", str(out_dir)]) == 0
    out, err = capsys.readouterr()
    assert f"dashboard {shlex.quote(str(out_dir / 'demo-trace.json'))}" in out
    assert "streamed" in out.split("plan (", 1)[1].split("\n", 1)[0]  # the budget forces streaming
    assert "ms/frame" in out and "VRAM" in out  # the dashboard's final render, as text
    assert "residency dashboard" in out and "demo-trace.json" in out and "residency play" in out
    if not torch.cuda.is_available():  # a GPU profile on the CPU: its prediction stated, no calibration of it
        text = " ".join(out.split())
        assert "so the two do not compare" in text and "%" not in text.split("measured", 1)[1].split(";", 2)[1]
        assert "not calibrated: the plan's profile is Radeon RX 7800 XT, a GPU profile, not this CPU" in text
        # nor does the closed loop fit it to this machine's timings (it read the copy engine 4x slow)
        assert "the closed loop is off" in " ".join(err.split())
    with Image.open(out_dir / "demo.gif") as gif:
        assert gif.n_frames == 5
    snapshot, context = read_trace(out_dir / "demo-trace.json")
    assert [f.frame for f in snapshot.frames][-1] == 5
    assert context.vram_budget_bytes is not None and context.frame_budget_ms is not None


def test_the_printed_next_steps_name_a_command_that_runs_here(tmp_path, monkeypatch):
    import shutil
    import sys

    from residency.commands.console import command_name

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    assert command_name() == "residency"  # on the PATH: the bare name
    monkeypatch.setattr(shutil, "which", lambda name: None)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.chdir(tmp_path)
    assert command_name() == "python -m residency"  # no script: the module form
    (bin_dir / "residency").write_text("#!/bin/sh\n")
    assert command_name() == ".venv/bin/residency"  # the README's form, from the checkout


def test_a_demo_refused_for_its_options_leaves_no_directory_it_created(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.json").write_text("")
    assert main(["demo", "-o", "new/deep/dir", "--profile", "empty.json", "--frames", "2"]) == 1
    assert "empty.json" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # the three levels made for -o went again
    (tmp_path / "kept").mkdir()
    assert main(["demo", "-o", "kept/sub", "--profile", "empty.json", "--frames", "2"]) == 1
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "sub").exists()  # only what it made


@pytest.mark.parametrize("name", ["demo.gif", "demo-trace.json"])
def test_a_directory_in_place_of_a_demo_output_gets_a_hint_demo_can_follow(tmp_path, monkeypatch, capsys, name):
    # run's hints were shown: "name a file in it" and "--trace trace.json", neither of which demo takes
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / name).mkdir(parents=True)
    assert main(["demo", "-o", "out", "--frames", "2"]) == 1
    err = capsys.readouterr().err
    assert f"the demo writes {name} into its -o directory" in err and "--trace" not in err.split("hint:")[1]
