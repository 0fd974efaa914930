"""`residency plan`: exit codes, sizes, JSON, the written plan, and every bad input's error and hint."""

import json
import re
from pathlib import Path

import pytest

from residency.cli import main
from residency.plan import load_plan


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_budget_that_holds_exits_0_and_writes_the_plan(capsys, tmp_path):
    out_path = tmp_path / "plan.json"
    code, out, err = run(capsys, "plan", "tiny", "--profile", "rx-7800-xt", "--fps", "30", "--vram", "2GiB",
                         "-o", str(out_path))
    assert code == 0, err
    assert "✓ holds" in out and "device memory at the peak" in out
    plan = load_plan(out_path)
    assert plan.model == "tiny" and plan.budget.vram_bytes == 2 * 2**30
    assert plan.budget.frame_ms == pytest.approx(1000 / 30)  # tiny: one video frame per latent frame
    assert json.loads(out_path.read_text())["holds_budget"] is True  # what the exit code said, in the file


def test_an_unreachable_frame_budget_exits_3_with_the_gap_and_still_writes(capsys, tmp_path):
    out_path = tmp_path / "plan.json"
    code, out, _ = run(capsys, "plan", "lucid-500m", "--profile", "rtx-3060-12gb", "--frame-ms", "1",
                       "-o", str(out_path))
    assert code == 3
    assert "misses the frame budget" in out and "needs " in out
    assert json.loads(out_path.read_text())["holds_budget"] is False
    assert load_plan(out_path).model == "lucid-500m"


def test_json_output_is_one_document_with_the_prediction(capsys):
    code, out, _ = run(capsys, "plan", "tiny", "--profile", "rtx-5090", "--vram", "6000MB", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["budget"]["vram_bytes"] == 6000 * 10**6
    assert doc["prediction"]["frame_ms"] > 0 and doc["holds_budget"] is True


def test_json_output_of_a_plan_that_does_not_fit_says_why_as_the_table_does(capsys):
    # exit 3 with "holds_budget": false and nothing else: the table's line said what it needs
    code, out, err = run(capsys, "plan", "tiny", "--profile", "rx-7800-xt", "--vram", "20MiB", "--json")
    assert code == 3 and err == ""
    said = json.loads(out)["verdict"]
    assert said.startswith("✗ does not fit: needs 132.0 MiB, budget 20.0 MiB") and "give --vram 132.1MiB" in said
    code, out, _ = run(capsys, "plan", "tiny", "--profile", "rx-7800-xt", "--vram", "2GiB", "--json")
    assert code == 0 and json.loads(out)["verdict"].startswith("✓ fits")


def test_policy_all_compares_every_peer(capsys):
    code, out, _ = run(capsys, "plan", "tiny", "--profile", "rx-7800-xt", "--policy", "all")
    assert code == 0
    for name in ("accelerate-sequential", "diffusers-group-offload", "comfyui-partial", "forge", "flexgen-lp"):
        assert name in out
    # each peer runs its documented modes (plan's default request is auto): group offloading compiles its blocks
    modes = next(line for line in out.splitlines() if line.startswith("execution modes"))
    assert "diffusers-group-offload compiled" in modes, modes


def test_exec_modes_summary_counts_blocks_per_mode():
    from dataclasses import replace

    from residency.commands.plan_render import exec_modes_summary
    from residency.plan import BlockPlan

    blocks = [BlockPlan(f"b{i}", "resident", "BF16", "bf16", "session", "compute") for i in range(5)]
    plan = type("P", (), {"blocks": blocks})()
    assert exec_modes_summary(plan) == "eager"
    plan.blocks = [replace(b, exec_mode="compiled") if i < 3 else b for i, b in enumerate(blocks)]
    assert exec_modes_summary(plan) == "compiled 3, eager 2"


def test_steps_change_the_plan(capsys):
    _, out2, _ = run(capsys, "plan", "tiny", "--profile", "rtx-5090", "--steps", "2", "--json")
    _, out8, _ = run(capsys, "plan", "tiny", "--profile", "rtx-5090", "--steps", "8", "--json")
    assert json.loads(out8)["prediction"]["frame_ms"] > json.loads(out2)["prediction"]["frame_ms"]


def test_compute_dtype_is_recorded_on_every_block_of_the_written_plan(capsys, tmp_path):
    out_path = tmp_path / "plan.json"
    code, _, err = run(capsys, "plan", "tiny", "--profile", "rtx-5090", "--compute-dtype", "fp32",
                       "-o", str(out_path))
    assert code == 0, err
    assert {b.compute_dtype for b in load_plan(out_path).blocks} == {"fp32"}


def test_the_default_compute_dtype_is_bf16(capsys):
    _, out, _ = run(capsys, "plan", "tiny", "--profile", "rtx-5090", "--json")
    assert {b["compute_dtype"] for b in json.loads(out)["blocks"]} == {"bf16"}


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["plan", "no-such-model", "--profile", "rtx-5090"], 2, "unknown model 'no-such-model'"),
        (["plan", "tiny", "--profile", "no-such-gpu"], 2, "no-such-gpu"),
        (["plan", "tiny", "--profile", "rtx-5090", "--vram", "lots"], 2, "argument --vram: cannot read the size 'lots'"),
        (["plan", "tiny", "--profile", "rtx-5090", "--vram", "50%%"], 2, "cannot read the share '50%%': a number"),
        (["plan", "tiny", "--profile", "rtx-5090", "--vram", "0%"], 2, "must be above 0% and at most 1000%, got"),
        (["plan", "tiny", "--profile", "rtx-5090", "--vram", "2000%"], 2, "must be above 0% and at most 1000%, got"),
        (["plan", "tiny", "--profile", "rtx-5090", "--fps", "-5"], 2, "argument --fps: must be a number"),
        (["plan", "tiny", "--profile", "rtx-5090", "--steps", "0"], 2, "argument --steps: must be a whole number"),
        (["plan", "tiny", "--profile", "rtx-5090", "--policy", "magic"], 2, "unknown policy 'magic'"),
        (["plan", "tiny", "--profile", "rtx-5090", "--compute-dtype", "int8"], 2, "argument --compute-dtype"),
        (["plan", "tiny", "--profile", "rtx-5090", "--fps", "30", "--frame-ms", "10"], 2, "not allowed"),
        (["plan", "tiny", "--profile", "rtx-5090", "-o", ""], 2, "-o needs a file name, got an empty one"),
        (["plan", "tiny", "--profile", "rtx-5090", "-o", "."], 1, "cannot write here"),
        (["plan", "tiny", "--profile", "rtx-5090", "-o", "plans/"], 1, "ends with '/', a directory's name"),
        (["plan", "tiny", "--profile", "rtx-5090", "-o", "start.png"], 2, "the name ends in .png"),
        (["plan", "tiny", "--profile", "rtx-5090", "-o", "-"], 2, "-o - would write a file named '-'"),
    ],
)
def test_bad_input_gets_an_error_and_a_hint_without_traceback(capsys, argv, code, message):
    got, _, err = run(capsys, *argv)
    assert got == code
    assert message in err
    assert "hint:" in err and "Traceback" not in err


def test_an_unwritable_output_leaves_no_file(capsys, tmp_path):
    target = tmp_path / "missing-dir" / "plan.json"
    code, _, err = run(capsys, "plan", "tiny", "--profile", "rtx-5090", "-o", str(target))
    assert code == 1 and "error:" in err and "hint:" in err
    assert not target.exists() and not target.parent.exists()


def test_a_vram_budget_beyond_the_device_is_planned_for_with_a_note(capsys):
    code, _, err = run(capsys, "plan", "tiny", "--profile", "rx-7800-xt", "--vram", "30GiB")
    assert code == 0
    assert "note: --vram 30.0 GiB is more than Radeon RX 7800 XT has to use" in err and "may not fit the device" in err
    code, _, err = run(capsys, "plan", "tiny", "--profile", "rx-7800-xt", "--vram", "1GiB")
    assert code == 0 and "note: --vram" not in err


def test_an_output_the_filesystem_refuses_fails_before_planning(capsys, tmp_path, monkeypatch):
    """A read-only filesystem (or a permission root does not have) is found by creating a file, not os.access."""
    import residency.atomic_file as atomic_file

    def read_only(*_args, **_kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(atomic_file.tempfile, "mkstemp", read_only)
    monkeypatch.setattr("residency.commands.plan_cmd.make_request", lambda *a, **k: pytest.fail("planned before -o"))
    code, _, err = run(capsys, "plan", "tiny", "--profile", "rx-7800-xt", "-o", str(tmp_path / "p.json"))
    assert code == 1 and "(Read-only file system)" in err and "hint:" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("share", ["50%", "12.5%", " 150% "])
def test_vram_as_a_share_of_the_weights_at_the_compute_dtype(capsys, share):
    """`--vram 50%` means what `make_plan(vram="50%")` means: that share of the weights' bytes at the compute dtype
    planned for (bf16 by default, fp32 when asked), so the CLI and the library agree on the budget."""
    from decimal import Decimal

    from residency.commands.sources import resolve_workload
    from residency.formats.dtypes import DTYPE_FORMAT

    for dtype in ("bf16", "fp32"):
        code, out, err = run(capsys, "plan", "lucid-500m", "--profile", "rtx-5090", "--vram", share,
                             "--compute-dtype", dtype, "--json")
        assert code in (0, 3), err
        weights = resolve_workload("lucid-500m", compute_dtype=dtype).nbytes(DTYPE_FORMAT[dtype])
        assert json.loads(out)["budget"]["vram_bytes"] == int(Decimal(weights) * Decimal(share.strip()[:-1]) / 100)


@pytest.mark.parametrize("share", ["0%", "-5%", "%", "abc%", "nan%", "5000%", "1e400%"])
def test_a_bad_share_is_a_usage_error(capsys, share):
    code, _, err = run(capsys, "plan", "tiny", "--profile", "rtx-5090", f"--vram={share}")
    assert code == 2 and "error: argument --vram" in err and repr(share) in err and "Traceback" not in err


def test_a_share_under_a_mebibyte_is_refused_naming_the_bytes_it_came_to(capsys):
    """Its hint named 64MiB, which never fits on a GPU profile (128 MiB of workspace alone): it names a size that
    holds the weights beside the workspace, and that size fits."""
    import re

    code, _, err = run(capsys, "plan", "tiny", "--profile", "rtx-5090", "--vram", "0.001%")
    assert code == 2 and "--vram 0.001% of the model's" in err and "under 1 MiB" in err and "hint:" in err
    size = re.search(r"a size such as (\S+) \(all of its weights, beside the device workspace", err).group(1)
    assert run(capsys, "plan", "tiny", "--profile", "rtx-5090", "--vram", size)[0] == 0


def test_default_is_the_shipped_model_run_loads(capsys, tmp_path):
    """`plan default` plans the model `run default` loads (same workload, the shipped sensitivity table), so its
    plan passes run's check; `inspect default` reads the same model."""
    from residency.commands.sources import shipped_sensitivity
    from residency.session_setup import load_model

    out_path = tmp_path / "plan.json"
    code, out, err = run(capsys, "plan", "default", "--profile", "rx-7800-xt", "-o", str(out_path))
    assert code in (0, 3), err
    assert out.startswith(f"{load_plan(out_path).model} (the shipped model, `default`) on ")  # the name the user gave
    model = load_model("default")
    load_plan(out_path).check_matches(model.workload, "default")  # raises on another model
    assert shipped_sensitivity("default") == model.sensitivity and shipped_sensitivity("tiny") is None
    code, out, err = run(capsys, "inspect", "default")
    assert code == 0, err
    assert "dit.cond_embed" in out and "dit.blocks.0–3 (×4)" in out and "as stored" in out


def test_run_reads_a_vram_share_of_the_weights_it_computes_in():
    """`run`/`play --vram 50%`: half the weights at the dtype the runtime computes in (fp32 on the CPU)."""
    from residency.commands.console import make_console
    from residency.session_setup import device_kind, load_model, make_plan

    model = load_model("tiny")
    _, plan, _ = make_plan(model, make_console(stderr=True), profile="rtx-5090", vram_bytes="50%")
    weights = model.workload.nbytes("F32" if device_kind() == "cpu" else "BF16")
    assert plan.budget.vram_bytes == weights // 2


def test_evictions_of_named_and_numbered_blocks_render_in_the_text_plan(capsys):
    """wan-causal-1.3b evicts its text encoder after encode: a named block beside a numbered list (the table's
    folding took every evicted name for one numbered list and raised on 'embed_tokens')."""
    code, out, err = run(capsys, "plan", "wan-causal-1.3b", "--profile", "rtx-5090")
    assert code in (0, 3), err
    line = " ".join(out.split("after encode: evict", 1)[1].split())
    assert line.split("as loaded): ", 1)[1].startswith(
        "text_encoder.encoder.embed_tokens, text_encoder.encoder.block.0–23 (×24), ")


def test_block_names_fold_by_numbered_list_in_order():
    from residency.commands.plan_render import _names_label

    assert _names_label(["t.embed", "t.block.0", "t.block.1", "t.block.3", "t.norm", "v.up.0"]) == (
        "t.embed, t.block.0–1,3 (×3), t.norm, v.up.0")
    assert _names_label(["a.2", "b", "a.0"]) == "a.0,2 (×2), b"


def test_a_cpu_plan_that_streams_says_why_little_crosses_its_link(capsys):
    cpu = str(Path(__file__).parent / "data" / "measured-cpu-2-cores.json")
    code, out, err = run(capsys, "plan", "default", "--profile", cpu, "--vram", "20MiB")
    assert code in (0, 3), err
    assert "on the CPU a streamed block converts straight from host memory" in " ".join(out.split())
    code, out, _ = run(capsys, "plan", "default", "--profile", "rtx-5090", "--vram", "20MiB")
    assert "converts straight from host memory" not in " ".join(out.split())


def test_declined_compiles_are_one_note_where_the_first_stood():
    from residency.commands.plan_render import _folded_notes

    notes = ["no frame budget: …", "a eager: compiling (23 s) would save only 16.4 s over a 600 s session",
             "b compiled: 7.0 → 3.5 ms per frame saves 270 s", "c eager: compiling (23 s) would save only 2.9 s over a "
             "600 s session", "planned in 0.07 s"]
    assert _folded_notes(notes) == [
        "no frame budget: …", "eager where compiling (23 s) would not repay itself over a 600 s session: a (saves "
        "16.4 s), c (saves 2.9 s)", "b compiled: 7.0 → 3.5 ms per frame saves 270 s", "planned in 0.07 s"]
    assert _folded_notes(notes[:2]) == notes[:2]  # one stays as it is
    many = [f"{c} eager: compiling (23 s) would save only {s} s over a 600 s session"
            for c, s in zip("defgh", ("0.0", "12.7", "0.4", "1.4", "0.1"), strict=True)]
    assert _folded_notes(many) == [  # the largest savings named, the rest counted (Flux listed 14, most 0.0 s)
        "eager where compiling (23 s) would not repay itself over a 600 s session: e (saves 12.7 s), g (saves 1.4 s), "
        "f (saves 0.4 s), and 2 more block classes saving 0.1 s or less"]


def test_a_budget_under_the_fixed_workspace_says_so_once(capsys):
    code, out, _ = run(capsys, "plan", "tiny", "--profile", "rtx-5090", "--vram", "50%")
    text = " ".join(out.split())
    assert code == 3 and "the device's fixed workspace alone is 128.0 MiB: no placement fits under it" in text
    assert text.count("does not fit") == 1


def test_a_plan_that_does_not_fit_says_what_would_and_that_it_misses_the_frame_budget_too(capsys):
    code, out, _ = run(capsys, "plan", "wan-causal-1.3b", "--profile", "rtx-3060-12gb", "--fps", "16",
                       "--vram", "2GiB")
    text = " ".join(out.split())
    need = re.search(r"does not fit: needs ([\d.]+) GiB, budget 2\.00 GiB; give --vram ([\d.]+)GiB or more", text)
    assert code == 3 and need and float(need[2]) >= float(need[1]), text
    assert re.search(r"this plan also misses the frame budget: [\d.]+ ms > 250\.00 ms per latent frame", text)


@pytest.mark.parametrize("vram, message, hint", [
    ("12", "got '12'", "a bare number is bytes: did you mean 12GiB?"),
    ("-1GiB", "the size must be positive, got '-1GiB'", "a size is positive"),  # not argparse's "expected one argument"
    ("0%", "a share of the weights must be above 0%", "e.g. 50%, or a size such as 6GiB"),
])
def test_a_usage_error_is_two_lines_the_error_and_its_own_hint(capsys, vram, message, hint):
    code, _, err = run(capsys, "plan", "tiny", "--profile", "rtx-5090", "--vram", vram)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 2, err
    assert lines[0].startswith("error: argument --vram: ") and message in lines[0]
    assert lines[1] == f"hint: {hint}" or lines[1].startswith(f"hint: {hint}")


def test_a_directory_given_as_model_or_profile_is_named_as_one(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    code, _, err = run(capsys, "plan", "tiny", "--profile", "adir")
    assert code == 1 and "adir: cannot read the profile (a directory, not a file)" in err
    code, _, err = run(capsys, "plan", "adir", "--profile", "rtx-5090")
    assert code == 1 and "adir: a directory with no model in it" in err and "hint:" in err


def test_without_profile_plan_uses_this_machines_cached_profile_as_run_does(capsys, tmp_path, monkeypatch):
    import shutil

    from residency.device import cached_profile_path, load_profile

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("residency.session_setup.device_kind", lambda: "cpu")

    def no_measuring(*args, **kwargs):
        raise AssertionError("the test measured a profile")

    monkeypatch.setattr("residency.device.measure_profile", no_measuring)
    cached_profile_path("cpu").parent.mkdir(parents=True)
    shutil.copy(Path(__file__).parent / "data" / "measured-cpu-2-cores.json", cached_profile_path("cpu"))
    code, out, err = run(capsys, "plan", "tiny", "--json")
    assert code in (0, 3), err
    doc = json.loads(out)
    cached = load_profile(cached_profile_path("cpu"))
    assert doc["profile"] == cached.name and doc["profile_fingerprint"] == cached.fingerprint()
    assert {b["compute_dtype"] for b in doc["blocks"]} == {"fp32"}  # a CPU profile: what run computes in


def test_a_frame_is_a_latent_frame_an_image_or_a_call_by_the_workload():
    import torch
    from torch import nn

    from pipelines.catalog import catalog_paths
    from residency.commands.plan_render import frame_unit
    from residency.workload import load_workload_file, module_workload

    assert frame_unit(load_workload_file(catalog_paths()["tiny"])) == "latent frame"
    assert frame_unit(load_workload_file(catalog_paths()["flux-schnell"])) == "image"
    mlp = nn.Sequential(*[nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(3)])
    assert frame_unit(module_workload(mlp, torch.randn(2, 16), name="m").workload) == "call"


def test_an_unknown_option_points_at_its_commands_help(capsys):
    code, _, err = run(capsys, "plan", "tiny", "--profile", "rtx-5090", "--frobnicate")
    assert code == 2 and err.strip().splitlines() == [
        "error: unrecognized arguments: --frobnicate", "hint: run 'residency plan --help' for the options"]


def test_a_plan_with_compiled_blocks_says_run_plans_eager_and_how_to_run_these(capsys):
    code, out, _ = run(capsys, "plan", "tiny", "--profile", "rx-7800-xt")
    assert code == 0 and "dit.blocks.* compiled" in out
    assert "plan eager for themselves" in " ".join(out.split())
    code, out, _ = run(capsys, "plan", "tiny", "--profile", "rx-7800-xt", "--exec-mode", "eager")
    assert code == 0 and "plan eager for themselves" not in " ".join(out.split())


def test_the_json_output_saved_to_a_file_loads_as_a_plan(capsys, tmp_path):
    for extra in ([], ["--policy", "all"]):
        code, out, _ = run(capsys, "plan", "tiny", "--profile", "rx-7800-xt", "--json", *extra)
        assert code == 0
        saved = tmp_path / "plan.json"
        saved.write_text(out)  # `plan --json > plan.json`: what a user does to keep a plan
        assert load_plan(saved).model == "tiny"
    doc = json.loads(out)
    doc["holds_budget"] = "yes"
    saved.write_text(json.dumps(doc))
    with pytest.raises(Exception, match="holds_budget"):
        load_plan(saved)


@pytest.mark.parametrize("keep", ["none", "session"])
def test_a_catalog_with_no_phase_per_latent_frame_is_refused_naming_phases(capsys, tmp_path, keep):
    """`"phases": []`, or a session phase only: ValueError 'max() arg is an empty sequence' from the simulator."""
    from pipelines.world_model.workload import catalog_entry

    doc = catalog_entry("tiny")
    doc["phases"] = [p for p in doc["phases"] if keep == "session" and p["per"] == "session"]
    path = tmp_path / "cat.json"
    path.write_text(json.dumps(doc))
    code, _, err = run(capsys, "plan", str(path), "--profile", "rx-7800-xt")
    err = " ".join(err.split())
    assert code == 1 and "no phase that runs per latent frame" in err and "'phases'" in err and "hint:" in err
    assert err.startswith(f"error: {path}: ")  # the file to fix, not the workload's name


def test_a_catalog_name_with_an_escape_sequence_is_refused_naming_its_field(capsys, tmp_path):
    """Printed in the plan's title and table, "\x1b[2J" cleared the terminal."""
    from pipelines.world_model.workload import catalog_entry

    doc = catalog_entry("tiny")
    doc["blocks"][0]["name"] = "\x1b[2Jb"
    path = tmp_path / "cat.json"
    path.write_text(json.dumps(doc))
    code, out, err = run(capsys, "plan", str(path), "--profile", "rx-7800-xt")
    assert code == 1 and "field 'blocks[0].name'" in err and "holds a control character" in err
    assert "\x1b" not in out + err


def test_a_catalog_tensor_larger_than_any_model_is_refused_naming_it(capsys, tmp_path):
    """Each dimension was bounded, not their product: a [2^40, 2^40] tensor planned as "2199023255552.0 TiB" with a
    hint of a --vram that --vram refuses."""
    from pipelines.world_model.workload import catalog_entry

    doc = catalog_entry("tiny")
    doc["blocks"][0]["tensors"][0][1] = [2**40, 2**40]
    path = tmp_path / "cat.json"
    path.write_text(json.dumps(doc))
    code, out, err = run(capsys, "plan", str(path), "--profile", "rx-7800-xt")
    assert code == 1 and "field 'blocks[0].tensors[0][1]'" in err and "more than the" in err and "TiB" not in out


@pytest.mark.parametrize("argv, hint", [(["plna"], "did you mean 'plan'?"), (["profiel"], "did you mean 'profile'?"),
                                        (["plan", "tiny", "--compute-dtype", "bf61"], "did you mean 'bf16'?"),
                                        (["xyzzy"], "run 'residency --help' for the options")])
def test_a_mistyped_choice_gets_the_close_one(capsys, argv, hint):
    """`residency plna` got argparse's list of commands, where a model's or profile's typo got "did you mean"."""
    code, _, err = run(capsys, *argv)
    assert code == 2 and "invalid choice" in err and err.strip().splitlines()[-1] == f"hint: {hint}"


def test_an_output_file_made_read_only_is_not_replaced(capsys, tmp_path, monkeypatch):
    """A rename ignores the target's mode: `-o` overwrote a file chmod a-w was to protect (and kept its mode)."""
    target = tmp_path / "p.json"
    target.write_text("{}")
    target.chmod(0o444)
    monkeypatch.setattr("residency.commands.plan_cmd.make_request", lambda *a, **k: pytest.fail("planned before -o"))
    code, _, err = run(capsys, "plan", "tiny", "--profile", "rx-7800-xt", "-o", str(target))
    assert code == 1 and "is read-only (mode 444)" in err and "chmod u+w" in err
    assert target.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_blocks_dequantized_on_the_copy_engine_say_so_in_the_dequant_column(capsys):
    # the column read 0.00 for them, as if their dequant were free; its time is in the copy column
    code, out, _ = run(capsys, "plan", "lucid-500m", "--profile", "rx-7800-xt", "--vram", "1GiB", "--json")
    on_copy = [b["name"] for b in json.loads(out)["blocks"] if b.get("dequant_on") == "copy"]
    assert on_copy  # this cell streams K-quant DiT blocks dequantized as they arrive
    code, out, _ = run(capsys, "plan", "lucid-500m", "--profile", "rx-7800-xt", "--vram", "1GiB")
    rows = [line for line in out.splitlines() if "(copy)" in line]
    assert rows and all("streamed" in r for r in rows)


def test_a_budget_too_large_for_a_plan_file_is_refused_before_planning(capsys, tmp_path):
    # --vram takes up to 2**60 bytes, a plan file up to 2**53: it planned, then the writer refused its own plan
    out = tmp_path / "big.json"
    assert main(["plan", "tiny", "--profile", "rx-7800-xt", "--vram", "9000TiB", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a plan file holds a budget of at most 8 PiB" in err and "leave -o out" in err and not out.exists()
    assert main(["plan", "tiny", "--profile", "rx-7800-xt", "--vram", "9000TiB"]) == 0  # no file: planned as asked
