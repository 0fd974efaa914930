"""`plan MODEL --plan FILE`: a plan file predicted, not planned — the one way to check an edited plan of a model
`run` does not run (a catalog model, a model directory)."""

from __future__ import annotations

import json

import pytest

from residency.cli import main


def plan(capsys, *argv):
    code = main(["plan", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture
def written(capsys, tmp_path):
    path = tmp_path / "p.json"
    code, _, err = plan(capsys, "tiny", "--profile", "rx-7800-xt", "--vram", "200MiB", "-o", path)
    assert code == 0, err
    return path


def test_an_unedited_plan_file_predicts_as_it_was_written(capsys, written):
    code, out, _ = plan(capsys, "tiny", "--profile", "rx-7800-xt", "--plan", written, "--json")
    doc, saved = json.loads(out), json.loads(written.read_text())
    assert code == 0 and doc["blocks"] == saved["blocks"] and doc["budget"] == saved["budget"]
    assert doc["prediction"]["frame_ms"] == pytest.approx(saved["prediction"]["frame_ms"], rel=1e-9)
    assert doc["notes"] == [f"the plan in {written}, predicted here for Radeon RX 7800 XT"]


def test_an_edited_plan_is_predicted_as_edited_and_its_budget_is_the_files(capsys, written):
    doc = json.loads(written.read_text())
    for block in doc["blocks"]:
        block["placement"], block["format"] = "resident", "BF16"
    doc["budget"]["vram_bytes"] = 140 * 2**20  # the GPU profile's workspace alone is 128 MiB
    edited = written.with_name("edited.json")
    edited.write_text(json.dumps(doc))
    code, out, _ = plan(capsys, "tiny", "--profile", "rx-7800-xt", "--plan", edited)
    flat = " ".join(out.split())
    assert code == 3 and "does not fit" in flat and f"set budget.vram_bytes in {edited} to" in flat, out
    code, out, _ = plan(capsys, "tiny", "--profile", "rtx-5090", "--plan", edited, "--json", "-o",
                        edited.with_name("for-5090.json"))
    doc = json.loads(out)
    assert doc["notes"][0].endswith("predicted here for GeForce RTX 5090; it was made for Radeon RX 7800 XT")
    # the profile fields follow the prediction: the file written names the profile its figures are for
    assert json.loads(edited.with_name("for-5090.json").read_text())["profile"] == doc["profile"] == "GeForce RTX 5090"


@pytest.mark.parametrize(("extra", "said"), [(("--vram", "1GiB"), "--vram with --plan: the plan file holds its own "
                                                                  "budget.vram_bytes"),
                                             (("--policy", "forge"), "--policy with --plan"),
                                             (("--compute-dtype", "fp16"), "--compute-dtype fp16 with --plan"),
                                             (("--steps", "2"), "--steps with --plan")])
def test_a_flag_that_would_remake_the_plan_is_refused_with_plan(capsys, written, extra, said):
    code, _, err = plan(capsys, "tiny", "--profile", "rx-7800-xt", "--plan", written, *extra)
    assert code == 2 and said in err and "hint:" in err


def test_a_plan_file_of_another_model_is_refused_naming_the_file(capsys, written):
    code, _, err = plan(capsys, "lucid-500m", "--profile", "rx-7800-xt", "--plan", written)
    assert code == 1 and err.startswith(f"error: {written}: the plan was made for model")
    assert f"-o {written}" not in err  # the hint never says to write over the file being checked


@pytest.mark.parametrize(("edit", "said"), [
    (lambda d: d.update(context_frames=0), "context_frames is 0 (or left out), but model tiny keeps 12"),
    (lambda d: d["blocks"][1].update(format="Q2_K"), "is Q2_K, a format residency reads from GGUF files but cannot"),
])
def test_an_edit_run_refuses_is_refused_here_too(capsys, written, edit, said):
    """`plan --plan` said ✓ fits (exit 0) for a plan `run --plan` refuses: a context edited out (predicted as if
    not: no fingerprint covers it), a format nothing packs."""
    doc = json.loads(written.read_text())
    edit(doc)
    written.write_text(json.dumps(doc))
    code, _, err = plan(capsys, "tiny", "--profile", "rx-7800-xt", "--plan", written)
    assert code == 1 and err.startswith(f"error: {written}: ") and said in err and "hint:" in err, err


def test_a_model_field_edited_to_another_model_is_said_and_shown_as_the_model_predicted(capsys, written):
    doc = json.loads(written.read_text())
    doc["model"] = "lucid-500m"
    written.write_text(json.dumps(doc))
    code, out, err = plan(capsys, "tiny", "--profile", "rx-7800-xt", "--plan", written, "--json")
    assert code == 0 and json.loads(out)["model"] == "tiny", err
    assert f"note: {written}: its model field says 'lucid-500m'" in " ".join(err.split())
