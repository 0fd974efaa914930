"""A plan file edited by hand after `residency plan` wrote it: its prediction was made for the plan as written, so it
is left out when read (run predicts it again). `"steps": 64` ran 64 steps under a prediction of 4."""

from __future__ import annotations

import json

import pytest

from pipelines.catalog import catalog_paths
from residency.cli import main
from residency.errors import ResidencyError
from residency.plan import load_plan
from residency.workload import load_workload_file

TINY = load_workload_file(catalog_paths()["tiny"])


@pytest.fixture
def written(tmp_path, capsys):
    path = tmp_path / "p.json"
    assert main(["plan", "tiny", "--profile", "rtx-3060-12gb", "--exec-mode", "eager", "-o", str(path)]) == 0
    capsys.readouterr()
    return path


def edit(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=3))  # another layout: only the values count
    return load_plan(path)


def test_a_plan_read_back_as_written_keeps_its_prediction_whatever_its_layout_or_notes(written):
    assert load_plan(written).prediction is not None
    plan = edit(written, lambda d: d["notes"].append("mine"))
    assert plan.prediction is not None and "mine" in plan.notes


@pytest.mark.parametrize("change", [
    lambda d: d.update(steps=64),
    lambda d: d["blocks"][3].update(placement="streamed"),
    lambda d: d["budget"].update(frame_ms=5.0),
    lambda d: d.update(context_frames=1),
])
def test_a_plan_edited_after_it_was_written_loses_its_prediction(written, change):
    assert edit(written, change).prediction is None


def test_a_plan_without_a_digest_is_read_as_before(written):
    assert edit(written, lambda d: d.pop("digest")).prediction is not None


def test_a_plan_prints_as_a_few_readable_lines(written):
    # print(rt.plan) was one line of the whole dataclass
    from residency.plan import load_plan

    plan = load_plan(written)
    text = str(plan)
    assert text.splitlines()[0].startswith(f"plan of {plan.model} on {plan.profile} by {plan.policy}: budget ")
    counts = {}
    for b in plan.blocks:
        counts[b.placement] = counts.get(b.placement, 0) + 1
    for placement, n in counts.items():
        assert f"{n} {placement} (" in text
    assert "predicted " in text and "quality loss" in text
    assert repr(plan).startswith("Plan(")  # the repr is still the dataclass's



@pytest.mark.parametrize("key, change, problem", [
    ("modules", lambda b: b.update(modules=["dit.nowhere"]), "'dit.nowhere' is not one of the block's modules"),
    ("tensors", lambda b: b.update(tensors=b["tensors"][1:]), "is missing"),
    ("tensors", lambda b: b.update(tensors=b["tensors"][::-1]), "another order"),
])
def test_a_blocks_modules_or_tensors_edited_are_refused_not_silently_ignored(written, key, change, problem):
    # they restate the model's blocks for a reader: an edit moved nothing and ran as if it had not been made
    plan = load_plan(written)
    name = plan.blocks[3].name
    with pytest.raises(ResidencyError) as err:
        edit(written, lambda d: change(d["blocks"][3])).check_matches(TINY)
    assert f"blocks[3].{key} ({name}) differ" in str(err.value) and problem in str(err.value)
    assert "editing them moves nothing" in err.value.hint
    plan.check_matches(TINY)  # as written


def test_a_plan_without_modules_or_tensors_is_checked_by_its_block_names_alone(written):
    def strip(doc):
        for b in doc["blocks"]:
            b.pop("modules"), b.pop("tensors")

    edit(written, strip).check_matches(TINY)


def _run_with(plan_path, tmp_path, capsys) -> str:
    import numpy as np
    from PIL import Image

    image = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    assert main(["run", "tiny", "--image", str(image), "--plan", str(plan_path), "--frames", "1",
                 "-o", str(tmp_path / "o.gif")]) == 0
    captured = capsys.readouterr()
    return captured.out + captured.err


@pytest.mark.parametrize("change", [
    lambda d: (d.pop("digest"), d["blocks"][3].update(placement="streamed")),  # no digest to tell the edit by
    lambda d: d["prediction"].update(frame_ms=1.0),  # the prediction alone edited: outside the digest
])
def test_run_predicts_a_plan_file_again_and_says_where_its_prediction_was_not_this_plans(written, tmp_path, capsys,
                                                                                            change):
    # it ran under the stale figure: "measured 86.1 ms; the plan predicted 52.8 ms (+63%)", with advice to calibrate
    assert "is not this plan's" not in _run_with(written, tmp_path, capsys)  # as written: its own figures
    edit(written, change)
    file_ms = json.loads(written.read_text())["prediction"]["frame_ms"]
    out = _run_with(written, tmp_path, capsys)
    assert f"({file_ms:.2f} ms per latent frame" in out
    assert "is not this plan's as it is" in out and "predicted here for GeForce RTX 3060 12GB" in out

