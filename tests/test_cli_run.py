"""`residency run` end to end on tiny, and the bad-input matrix of run/play/dashboard/demo.

Every bad input exits 1 or 2 with `error:` and `hint:` on stderr, no traceback, and no output file.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.world_model.trained import GAME_CONFIG
from pipelines.world_model.workload import catalog_entry
from residency.cli import main
from residency.device import cached_profile_path
from residency.device.profile_io import profile_path
from residency.plan import BlockPlan, Budget, Plan, save_plan
from residency.workload import workload_from_dict

PROFILE = ["--profile", "rx-7800-xt"]  # a shipped profile: no measurement in tests
CPU_PROFILE = Path(__file__).parent / "data" / "measured-cpu-2-cores.json"  # one measured here, for the CPU runtime


@pytest.fixture()
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # demo plans with this machine's cached profile: seed the cache so no test measures one (~15 s)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "residency").mkdir(parents=True)
    shutil.copy(profile_path("rx-7800-xt"), cached_profile_path("cpu"))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "start.png")
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "notimage.png").write_text("hello")
    w = workload_from_dict(catalog_entry(GAME_CONFIG))  # another model than tiny
    save_plan(Plan(model=w.name, workload_fingerprint=w.fingerprint(), profile="x", profile_fingerprint="-",
                   policy="test", budget=Budget(2**30), blocks=tuple(BlockPlan(b.name, "resident", "F32", "fp32")
                                                                    for b in w.blocks),
                   steps=w.steps, context_frames=w.context_frames), tmp_path / "other-plan.json")
    return tmp_path


def listing(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def test_run_writes_a_gif_and_a_trace_the_dashboard_renders(files, capsys):
    code = main(["run", "tiny", "--image", "start.png", *PROFILE, "--vram", "24MiB", "--fps", "15",
                 "--actions", "right*2,jump", "--frames", "4", "-o", "out.gif", "--trace", "trace.json"])
    out, err = capsys.readouterr()
    assert code == 0
    if not torch.cuda.is_available():  # 24 MiB is under the GPU profile's workspace: said, and run all the same
        assert "✗ does not fit" in err and "note: it runs all the same" in " ".join(err.split())
    with Image.open(files / "out.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (64, 64)
    assert "measured" in out and "predicted" in out
    if not torch.cuda.is_available():  # a GPU profile's prediction is stated, not compared with the CPU's ms
        line = " ".join(out.split("measured", 1)[1].split())  # the console wraps it
        assert "is predicted for Radeon RX 7800 XT, a GPU profile, not this CPU, so the two do not compare" in line
        assert "%" not in line, out
    assert main(["dashboard", "trace.json", "--once"]) == 0
    text = capsys.readouterr().out
    assert "frame 4 · tiny" in text and "fps" in text and "dit.blocks.0" in text and "kv_cache" in text
    if not torch.cuda.is_available():  # the replay does not divide CPU times by the GPU's predictions either
        flat = " ".join(text.replace("│", " ").split())  # the panel wraps lines inside its border
        assert "predicted for Radeon RX 7800 XT, a GPU profile, not this CPU: not compared" in flat
        assert "predictions are for Radeon RX 7800 XT" in flat
        assert not re.search(r"\d\.\d\d×", flat.split("per latent frame", 1)[1])  # no measured ÷ predicted


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runtime holding a GPU plan")
def test_a_gpu_plan_that_misses_its_budget_even_without_the_workspace_is_refused_before_running(files, capsys):
    """It said "note: it runs all the same", and the next line was the ledger's refusal in raw byte counts."""
    assert main(["plan", "tiny", *PROFILE, "--vram", "1MiB", "-o", "p.json"]) == 3
    capsys.readouterr()
    code = main(["run", "tiny", "--image", "start.png", "--plan", "p.json", "--frames", "2", "-o", "out.gif"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 3 and "runs all the same" not in err and not (files / "out.gif").exists()
    assert "p.json does not fit its 1.00 MiB VRAM budget even as this CPU runtime holds it (without Radeon RX 7800 " \
           "XT's workspace" in err
    need = err.split("hint: make the plan again with `residency plan … --vram ")[1].split("`")[0]
    assert main(["plan", "tiny", *PROFILE, "--vram", need, "-o", "p.json"]) == 3  # the hint's size: it runs
    capsys.readouterr()
    assert main(["run", "tiny", "--image", "start.png", "--plan", "p.json", "--frames", "2", "-o", "out.gif"]) == 0
    assert "note: it runs all the same" in " ".join(capsys.readouterr().err.split())
    # planned here (no --plan): "the plan", and the --vram to give (it read "None does not fit … make the plan again")
    assert main(["run", "tiny", "--image", "start.png", *PROFILE, "--vram", "1MiB", "--frames", "2", "-o", "o.gif"]) == 3
    err = " ".join(capsys.readouterr().err.split())
    assert "error: the plan does not fit its 1.00 MiB VRAM budget even as this CPU runtime holds it" in err
    assert "hint: raise --vram to at least" in err and "None" not in err


def test_a_directory_with_no_model_in_it_says_what_run_takes(files, capsys):
    """It said "point at a checkpoint file or shard directory", which names neither what run rolls out nor how."""
    (files / "empty").mkdir()
    code = main(["run", "empty", "--image", "start.png", *PROFILE, "-o", "o.gif"])
    err = capsys.readouterr().err
    assert code == 1 and "empty: no saved world-model pipeline here" in err and "WorldModelPipeline.save_pretrained" in err


def test_run_writes_numbered_pngs(files, capsys):
    assert main(["run", "tiny", "--image", "start.png", *PROFILE, "--frames", "2", "-o", "f.png"]) == 0
    assert (files / "f-0000.png").is_file() and (files / "f-0001.png").is_file()
    # two frames are both warm-up frames (a compile's 31 s had read as "measured 31573.0 ms per latent frame"):
    # said so, and not compared with the steady prediction
    out = " ".join(capsys.readouterr().out.split())
    assert "for the last latent frame, a warm-up frame" in out and "--frames 4 or more" in out
    assert "%" not in out.split("measured", 1)[1] and "hint: the prediction is off" not in out


BAD = [
    (["run", "tiny", "--image", "missing.png", *PROFILE, "-o", "o.gif"], 1, "cannot read the start image (no such file)"),
    (["run", "tiny", "--image", "notimage.png", *PROFILE, "-o", "o.gif"], 1, "not a readable image"),
    (["run", "tiny", "--image", "small.png", *PROFILE, "-o", "o.gif"], 1, "image is 48x32"),
    (["run", "tiny", "*PROFILE", "-o", "o.gif"], 2, "needs a start image"),
    (["run", "tiny", "--image", "start.png", *PROFILE, "--actions", "right*2,fly", "-o", "o.gif"], 2,
     "unknown action 'fly'"),
    (["run", "tiny", "--image", "start.png", *PROFILE, "--actions", "right*0", "-o", "o.gif"], 2, "bad repeat"),
    (["run", "nosuch", "--image", "start.png", *PROFILE, "-o", "o.gif"], 2, "unknown model 'nosuch'"),
    (["run", "TINY", "--image", "start.png", *PROFILE, "-o", "o.gif"], 2, "unknown model 'TINY' (did you mean tiny?)"),
    # two letters swapped across a third: difflib's ratio (0.5) suggested nothing
    (["run", "tyni", "--image", "start.png", *PROFILE, "-o", "o.gif"], 2, "unknown model 'tyni' (did you mean tiny?)"),
    (["run", "mini", "--image", "start.png", *PROFILE, "-o", "o.gif"], 2, "unknown model 'mini'\nhint"),  # a word
    (["run", "lucid-500m", *PROFILE, "-o", "o.gif"], 1, "needs real weights"),
    (["run", "flux-schnell", *PROFILE, "-o", "o.gif"], 1, "flux-schnell is a catalog model"),
    (["run", "tiny", "--image", "start.png", "--profile", "nosuch-gpu", "-o", "o.gif"], 2, "unknown profile"),
    (["run", "tiny", "--image", "start.png", *PROFILE, "-o", "nodir/o.gif"], 1, "does not exist"),
    # a file where the directory should be: not "directory start.png does not exist; create it first"
    (["run", "tiny", "--image", "start.png", *PROFILE, "-o", "start.png/o.gif"], 1,
     "start.png is a file, not a directory"),
    (["run", "tiny", "--image", "start.png", *PROFILE, "-o", "o.mp4"], 2, "cannot write .mp4"),  # as --trace x.txt
    (["run", "tiny", "--image", "start.png", *PROFILE, "-o", "."], 1, "is a directory; frames are written to a file"),
    (["run", "tiny", "--image", "start.png", *PROFILE, "-o", "frames/"], 1, "ends with '/', a directory's name"),
    (["run", "tiny", "--image", "start.png", *PROFILE, "-o", "o.gif", "--trace", "nodir/t.json"], 1,
     "does not exist"),
    (["run", "tiny", "--image", "start.png", *PROFILE, "-o", "o.gif", "--trace", "."], 1,
     "a directory, not a trace file"),
    (["run", "tiny", "--image", "start.png", "--plan", "other-plan.json", "-o", "o.gif"], 1,
     "the plan was made for model 'game-64'"),
    (["run", "tiny", "--image", "start.png", *PROFILE, "--fps", "0", "-o", "o.gif"], 2,
     "argument --fps: must be a number of frames per second above 0.01"),
    (["run", "tiny", "--image", "start.png", *PROFILE, "-o", "o.gif", "--dashboard"], 2, "needs a terminal"),
    (["run", "tiny", "--image", "start.png", "--profile", str(CPU_PROFILE), "--vram", "1MiB", "-o", "o.gif"], 3,
     "no plan fits the 1.00 MiB VRAM budget: the smallest ours found needs"),
    (["run", "tiny", "--image", "start.png", "--plan", "other-plan.json", "--vram", "1MiB", "--fps", "5", "-o",
      "o.gif"], 2, "--fps, --vram would be ignored: a plan from --plan fixes its profile and budgets"),
    (["play", "tiny", "--image", "start.png", *PROFILE], 2, "needs a terminal"),
    (["dashboard", "trace.json"], 2, "needs a terminal"),
    # each says what works without a terminal for that command (only `dashboard` has --once)
    (["run", "tiny", "--image", "start.png", *PROFILE, "-o", "o.gif", "--dashboard"], 2, "hint: drop --dashboard"),
    (["play", "tiny", "--image", "start.png", *PROFILE], 2, "use `residency run MODEL --actions"),
    # a typo off a terminal was reported as the terminal
    (["play", "tiyn", "--image", "start.png", *PROFILE], 2, "unknown model 'tiyn' (did you mean tiny?)"),
    (["dashboard", "trace.json"], 2, "hint: add --once"),
    (["dashboard", "missing.json", "--once"], 1, "no such trace file"),
    (["dashboard", "notimage.png", "--once"], 1, "not valid JSON"),
    (["demo", "-o", "notimage.png/out"], 1, "cannot create the output directory"),
    (["demo", "--frames", "0"], 2, "argument --frames: must be a whole number of latent frames from 1 to 10000"),
]


@pytest.mark.parametrize("argv,code,message", BAD, ids=[" ".join(a[:1] + [m]) for a, _, m in BAD])
def test_bad_input_gives_error_and_hint_and_no_output(files, capsys, argv, code, message):
    argv = [a for a in argv if a != "*PROFILE"] + (PROFILE if "*PROFILE" in argv else [])
    before = listing(files)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "error: " in err and message in err, err
    assert "hint: " in err and "Traceback" not in err
    assert listing(files) == before


def test_a_cached_profile_of_an_older_measurement_method_is_not_used(tmp_path, monkeypatch):
    from residency.device import cached_profile_path
    from residency.device.measure import MEASUREMENT_VERSION

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = cached_profile_path("cpu")
    assert path.parent == tmp_path / "residency"
    assert path.name == f"profile-cpu-m{MEASUREMENT_VERSION}.json"  # profile-cpu.json of older releases is ignored


def test_an_unreadable_cached_profile_is_measured_again(tmp_path, monkeypatch):
    from rich.console import Console

    from residency import session_setup

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = cached_profile_path("cpu")
    path.parent.mkdir(parents=True)
    path.write_text("{ not json")
    measured = []

    def fake_measure(device, quick, source=None):  # stands in for the ~25 s measurement
        from residency.device import load_profile

        measured.append(device)
        return load_profile("rx-7800-xt")

    monkeypatch.setattr("residency.device.measure_profile", fake_measure)
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)
    profile = session_setup.cached_profile("cpu", console)
    console.file.close()
    assert measured == ["cpu"] and profile.name
    assert "unreadable" in (tmp_path / "log.txt").read_text()
    assert session_setup.cached_profile("cpu", Console(file=open(tmp_path / "log2.txt", "w"))).name == profile.name
    assert measured == ["cpu"]  # the re-measured profile was cached


def test_a_loaded_plan_is_compared_only_on_a_device_of_its_profiles_kind(files, capsys):
    """A plan file names its profile by fingerprint: a shipped GPU profile's plan run on the CPU states its
    prediction (no '+314%'); a plan for this CPU's profile that cannot fit is refused before the rollout."""
    assert main(["plan", "tiny", *PROFILE, "--exec-mode", "eager", "-o", "gpu-plan.json"]) in (0, 3)
    capsys.readouterr()
    assert main(["run", "tiny", "--image", "start.png", "--plan", "gpu-plan.json", "--frames", "3",
                 "-o", "g.gif"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    if not torch.cuda.is_available():
        assert "is predicted for Radeon RX 7800 XT, a GPU profile, not this CPU, so the two do not compare" in out
    shutil.copy(CPU_PROFILE, cached_profile_path("cpu"))  # this machine's profile: same kind as the runtime
    assert main(["plan", "tiny", "--profile", str(CPU_PROFILE), "--vram", "1MiB", "-o", "small.json"]) == 3
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert main(["run", "tiny", "--image", "start.png", "--plan", "small.json", "-o", "s.gif"]) == 3
        err = " ".join(capsys.readouterr().err.split())
        # a plan file is not a search: its own budget, not "the smallest ours found"
        assert "small.json does not fit its own 1.00 MiB VRAM budget: it needs" in err
        assert not (files / "s.gif").exists()


def test_a_plan_file_without_its_prediction_is_predicted_here_or_said_to_have_none(files, capsys):
    """The schema leaves `prediction` out or null; `run --plan` of such a file raised AttributeError
    ('NoneType' object has no attribute 'peak_total_bytes')."""
    import json

    assert main(["plan", "tiny", *PROFILE, "--exec-mode", "eager", "-o", "p.json"]) in (0, 3)
    doc = json.loads((files / "p.json").read_text())
    doc.pop("prediction")
    (files / "bare.json").write_text(json.dumps(doc))
    doc["profile_fingerprint"] = "0" * 16  # a profile not known here
    (files / "unknown.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["run", "tiny", "--image", "start.png", "--plan", "bare.json", "--frames", "2", "-o", "b.gif"]) == 0
    out = " ".join("".join(capsys.readouterr()).split())
    assert "bare.json holds no prediction of the plan as it is" in out and "predicted here for Radeon RX 7800 XT" in out and "ms per latent frame" in out
    assert main(["run", "tiny", "--image", "start.png", "--plan", "unknown.json", "--frames", "2", "-o", "u.gif"]) == 0
    out = " ".join("".join(capsys.readouterr()).split())
    # the name is a shipped profile's: the mismatch is its fingerprint, and the line says so
    assert ("no prediction: the plan holds none, and its profile (Radeon RX 7800 XT, fingerprint 0000000000000000) "
            "matches neither a shipped one nor this machine's cached one by fingerprint") in out


def test_an_edited_plan_for_a_cpu_profile_file_runs_within_ram_its_model_needs(files, capsys):
    """A plan made with a CPU profile file (`residency profile -o cpu.json`) and edited since has no prediction and
    no profile here: the host RAM check took its whole VRAM budget (most of the RAM) as device memory and refused a
    28 MiB model ("20.8 GiB of device memory in RAM")."""
    import dataclasses
    import json

    from residency.device import load_profile
    from residency.device.profile_io import save_profile

    measured = load_profile(CPU_PROFILE)  # made elsewhere: neither shipped nor this cache's
    save_profile(dataclasses.replace(measured, name="a CPU profile file", memory_total_bytes=2**50,
                                     memory_usable_bytes=2**50 - measured.memory_reserve_bytes), files / "cpu.json")
    assert main(["plan", "tiny", "--profile", "cpu.json", "--vram", "900TiB", "-o", "p.json"]) in (0, 3)
    doc = json.loads((files / "p.json").read_text())
    doc["blocks"][0]["format"] = "BF16"
    doc.pop("prediction")
    (files / "edited.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["run", "tiny", "--image", "start.png", "--plan", "edited.json", "--frames", "2", "-o", "e.gif"]) == 0
    out = " ".join("".join(capsys.readouterr()).split())
    assert "holds no prediction, so this run measures without comparing" in out and (files / "e.gif").is_file()


def test_a_plan_file_whose_blocks_compute_in_two_dtypes_is_refused_naming_the_block(files, capsys):
    """`run` casts the whole model to one dtype: a plan file with one block edited to fp16 was stated, predicted and
    then failed at attach with a library hint (make_plan(workload_from_module(…)))."""
    import json

    assert main(["plan", "tiny", *PROFILE, "--exec-mode", "eager", "-o", "p.json"]) in (0, 3)
    doc = json.loads((files / "p.json").read_text())
    first = doc["blocks"][0]["compute_dtype"]
    doc["blocks"][2]["compute_dtype"] = "fp16" if first != "fp16" else "bf16"
    (files / "mixed.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["run", "tiny", "--image", "start.png", "--plan", "mixed.json", "--frames", "2", "-o", "m.gif"]) == 1
    out, err = capsys.readouterr()
    err = " ".join(err.split())
    assert f"mixed.json: blocks[2].compute_dtype for block {doc['blocks'][2]['name']} is" in err
    assert "workload_from_module" not in err and "--compute-dtype" in err and "plan (" not in out
    assert not (files / "m.gif").exists()


def test_edits_a_plan_file_cannot_carry_are_refused_naming_the_file(files, capsys):
    """context_frames edited to 1024 ran, the plan said to hold within a budget its KV cache alone overran (the runtime
    reads the model's own); a block named twice was refused without naming the file; an edited fingerprint got a
    hint that the steps were edited."""
    import json

    assert main(["plan", "tiny", *PROFILE, "--exec-mode", "eager", "-o", "p.json"]) in (0, 3)
    doc = json.loads((files / "p.json").read_text())
    cases = {"ctx": {**doc, "context_frames": doc["context_frames"] + 1000},
             "twice": {**doc, "blocks": [doc["blocks"][0], *doc["blocks"][:-1]]},
             "print": {**doc, "workload_fingerprint": "deadbeef"}}
    said = {}
    for name, edited in cases.items():
        (files / f"{name}.json").write_text(json.dumps(edited))
        capsys.readouterr()
        assert main(["run", "tiny", "--image", "start.png", "--plan", f"{name}.json", "-o", f"{name}.gif"]) == 1
        said[name] = " ".join(capsys.readouterr().err.split())
        assert said[name].startswith(f"error: {name}.json: ") and not (files / f"{name}.gif").exists()
    assert f"context_frames is {doc['context_frames'] + 1000}, but model tiny" in said["ctx"]
    assert f"put it back to {doc['context_frames']}" in said["ctx"]
    assert "does not name the blocks of model tiny" in said["twice"]
    assert "steps edited" not in said["print"] and "at no step count" in said["print"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the plan's CPU profile is not this runtime's kind there")
def test_a_plan_file_over_its_budget_whose_profile_is_not_known_here_exits_3_naming_the_file(files, capsys):
    """With its profile measured again since (no prediction to check first), the plan failed at attach as a bare
    ledger error, exit 1; with its profile known it is exit 3, naming the file."""
    import json

    assert main(["plan", "tiny", "--profile", str(CPU_PROFILE), "--vram", "64MiB", "-o", "p.json"]) in (0, 3)
    doc = json.loads((files / "p.json").read_text())
    doc["profile_fingerprint"] = "0" * 16  # the profile re-measured since: known here by no fingerprint
    doc["budget"]["vram_bytes"] = 2**20
    (files / "stale.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["run", "tiny", "--image", "start.png", "--plan", "stale.json", "--frames", "2", "-o", "s.gif"]) == 3
    err = " ".join(capsys.readouterr().err.split())
    assert "error: stale.json does not fit its own 1.00 MiB VRAM budget as this runtime holds it" in err
    assert "residency plan tiny … -o stale.json" in err and not (files / "s.gif").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU profile's plan is of this runtime's kind there")
def test_a_plan_made_from_a_gpu_profile_file_known_only_by_its_plan_is_not_compared_with_the_cpu(files, capsys):
    """A GPU plan made from a profile file not shipped nor cached here was compared with the CPU's measurements
    (+317%): the profile could not be found by fingerprint, and the plan did not say its backend."""
    import json

    doc = json.loads((Path(__file__).resolve().parents[1] / "profiles" / "rtx-3060-12gb.json").read_text())
    doc["name"] = "My team's RTX 3060"
    (files / "mine.json").write_text(json.dumps(doc))
    assert main(["plan", "tiny", "--profile", "mine.json", "--exec-mode", "eager", "-o", "p.json"]) in (0, 3)
    capsys.readouterr()
    assert main(["run", "tiny", "--image", "start.png", "--plan", "p.json", "--frames", "2", "-o", "m.gif"]) == 0
    out = " ".join("".join(capsys.readouterr()).split())
    assert "which this run does not compare its measurements with" in out and "+" not in out.split("measured")[-1]


def test_run_takes_a_plans_denoise_steps_and_refuses_steps_edited_into_a_plan(files, capsys):
    """`plan tiny --steps 8 -o` then `run --plan` was refused (the model's 4 steps gave another fingerprint), and
    steps edited into a 4-step plan ran 4 steps while the note said the plan was predicted again."""
    import json

    from residency.dashboard import read_trace

    for steps in (4, 8):
        assert main(["plan", "tiny", *PROFILE, "--exec-mode", "eager", "--steps", str(steps),
                     "-o", f"p{steps}.json"]) in (0, 3)
        capsys.readouterr()
        assert main(["run", "tiny", "--image", "start.png", "--plan", f"p{steps}.json", "--frames", "2", "-o",
                     f"r{steps}.gif", "--trace", f"t{steps}.json"]) == 0
    calls = {s: max(b.calls for f in read_trace(files / f"t{s}.json")[0].frames for b in f.blocks
                    if b.block == "dit.blocks.0") for s in (4, 8)}
    assert calls == {4: 4 + 1, 8: 8 + 1}  # a frame: the denoise steps, then the pass that commits it to the cache
    doc = json.loads((files / "p4.json").read_text())
    doc["steps"] = 8
    (files / "edited.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["run", "tiny", "--image", "start.png", "--plan", "edited.json", "-o", "e.gif"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "other shapes, dtypes or settings" in err and "residency plan tiny --steps 8 -o" in err
    doc = json.loads((files / "p8.json").read_text())
    doc["steps"] = 4  # the model's own steps: it got the generic "make a new plan for this model"
    (files / "back.json").write_text(json.dumps(doc))
    assert main(["run", "tiny", "--image", "start.png", "--plan", "back.json", "-o", "e.gif"]) == 1
    assert "residency plan tiny --steps 4 -o" in " ".join(capsys.readouterr().err.split())
    doc["steps"] = 12
    (files / "twelve.json").write_text(json.dumps(doc))
    assert main(["run", "tiny", "--image", "start.png", "--plan", "twelve.json", "-o", "e.gif"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "twelve.json: steps is 12" in err and "from 1 to 8" in err
    other = json.loads((files / "other-plan.json").read_text())
    other["steps"] = 30  # another model's plan: said to be one, whatever its steps
    (files / "other30.json").write_text(json.dumps(other))
    assert main(["run", "tiny", "--image", "start.png", "--plan", "other30.json", "-o", "e.gif"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "the plan was made for model" in err and "steps" not in err
    doc = json.loads((files / "p8.json").read_text())
    doc["blocks"] = doc["blocks"][1:]  # this model's 8-step plan, a block edited out: compared at its 8 steps
    (files / "dropped.json").write_text(json.dumps(doc))
    assert main(["run", "tiny", "--image", "start.png", "--plan", "dropped.json", "-o", "e.gif"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "does not name the blocks of model tiny" in err and "missing block 'vae.encoder.blocks.0'" in err
    assert "fingerprint" not in err and "residency plan tiny --steps 8 -o plan.json" in err
    assert not (files / "e.gif").exists()


def test_a_document_given_as_the_model_is_said_to_be_one(files, capsys):
    """`run plan.json` said "unknown checkpoint extension '.json'", where inspect said what the file is."""
    assert main(["plan", "tiny", *PROFILE, "-o", "mine.json"]) in (0, 3)
    (files / "indented.json").write_text('{\n  "schema_version": 2,\n  "model": "x"\n}')  # no kind told
    capsys.readouterr()
    for given, words in (("mine.json", ["this is a plan", "--plan FILE", "residency run default --plan FILE"]),
                         (str(CPU_PROFILE), ["this is a device profile", "--profile FILE"]),
                         ("indented.json", ["a JSON document, not a model"])):
        assert main(["run", given, "-o", "r.gif"]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert all(w in err for w in words) and "extension" not in err, err
    assert not (files / "r.gif").exists()


def test_a_plan_naming_a_dequant_only_format_is_refused_naming_the_file_and_block(files, capsys):
    """It printed its prediction ("✓ holds"), then failed while packing, naming neither file nor block."""
    import json

    assert main(["plan", "tiny", *PROFILE, "--exec-mode", "eager", "-o", "p.json"]) in (0, 3)
    doc = json.loads((files / "p.json").read_text())
    doc["blocks"][3]["format"] = "Q3_K"
    (files / "q3.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["run", "tiny", "--image", "start.png", "--plan", "q3.json", "-o", "q.gif"]) == 1
    out, err = capsys.readouterr()
    err = " ".join(err.split())
    assert f"q3.json: blocks[3].format for block {doc['blocks'][3]['name']} is Q3_K" in err and "Q4_K" in err
    assert "holds" not in out + err and not (files / "q.gif").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU captures graphs")
def test_a_graphed_plan_is_refused_before_the_plan_is_stated_on_the_cpu_backend(files, capsys):
    # it said "✓ fits" and then failed with the runtime's error for its first block
    assert main(["plan", "tiny", *PROFILE, "--exec-mode", "graphed", "-o", "g.json"]) == 0
    capsys.readouterr()
    assert main(["run", "tiny", "--image", "start.png", "--plan", "g.json", "--frames", "2", "-o", "g.gif"]) == 1
    out, err = capsys.readouterr()
    assert "g.json runs 17 blocks graphed" in err and "--exec-mode eager" in err
    assert "fits" not in out and not (files / "g.gif").exists()


@pytest.mark.parametrize("command", ["run", "demo"])
def test_an_output_that_fails_to_write_leaves_the_other_as_it_was_and_no_other_file(files, capsys, monkeypatch,
                                                                                    command):
    """A full disk at the second output: exit 1, and the first, written just before, had replaced the one there
    before (run writes the trace first, demo the GIF: the second of each is made to fail)."""
    import residency.dashboard
    import residency.media

    def full(*args):
        path = args[-1] if command == "demo" else args[1]
        raise residency.errors.ResidencyError(f"{path}: writing failed (No space left on device)", hint="free space")
    monkeypatch.setattr(residency.dashboard if command == "demo" else residency.media,
                        "write_trace" if command == "demo" else "write_frames", full)
    gif = files / ("out.gif" if command == "run" else "d/demo.gif")
    trace = files / ("t.json" if command == "run" else "d/demo-trace.json")
    gif.parent.mkdir(exist_ok=True)
    gif.write_bytes(b"old")
    trace.write_bytes(b"old trace")
    before = listing(files)
    argv = (["run", "tiny", "--image", "start.png", "-o", "out.gif", "--trace", "t.json"] if command == "run" else
            ["demo", "-o", "d"])
    code = main([*argv, *PROFILE, "--frames", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "writing failed (No space left on device)" in err and "pending" not in err, err
    assert f"{(gif if command == 'run' else trace).name}: writing failed" in err
    assert gif.read_bytes() == b"old" and trace.read_bytes() == b"old trace"
    assert listing(files) == before  # nothing new, nothing half-written


def test_a_rename_that_fails_puts_back_the_outputs_renamed_before_it(tmp_path, monkeypatch):
    """The renames ran one after another: the second failing left the first output new, the second old, and the
    error named a pending file that no longer existed."""
    import os

    from residency.errors import ResidencyError
    from residency.written_together import written_together

    (tmp_path / "a.gif").write_bytes(b"old gif")
    (tmp_path / "t.json").write_bytes(b"old trace")
    real = os.replace

    def refuses_the_trace(src, dst):
        if str(src).endswith(".pending.json"):
            raise IsADirectoryError(21, "Is a directory", str(src))
        return real(src, dst)
    monkeypatch.setattr(os, "replace", refuses_the_trace)
    with pytest.raises(ResidencyError, match=r"t\.json: writing failed \(Is a directory\)"):
        with written_together(tmp_path / "a.gif", tmp_path / "t.json") as (gif, trace):
            gif.write_bytes(b"new gif")
            trace.write_bytes(b"new trace")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {"a.gif": b"old gif", "t.json": b"old trace"}


def test_a_plan_files_edited_profile_backend_is_said_and_read_from_the_profile(files, capsys):
    """The digest does not cover profile_backend: edited, the run kept the file's figures and called a GPU profile's
    plan one for "this CPU" in one line and "a GPU profile" in the next."""
    import json

    assert main(["plan", "tiny", *PROFILE, "--exec-mode", "eager", "-o", "p.json"]) in (0, 3)
    doc = json.loads((files / "p.json").read_text())
    doc["profile_backend"] = "cpu"
    (files / "edited.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["run", "tiny", "--image", "start.png", "--plan", "edited.json", "--frames", "2", "-o", "e.gif"]) == 0
    out = " ".join("".join(capsys.readouterr()).split())
    assert "edited.json says its profile's backend is 'cpu'; the profile it names (Radeon RX 7800 XT) is 'rocm'" in out
    doc["profile_backend"] = "gpu"
    (files / "bad.json").write_text(json.dumps(doc))
    assert main(["run", "tiny", "--image", "start.png", "--plan", "bad.json", "--frames", "2", "-o", "b.gif"]) == 1
    assert "expected one of \"\", cuda, rocm, cpu" in capsys.readouterr().err  # the empty choice shown, not a blank
