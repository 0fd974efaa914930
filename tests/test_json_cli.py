"""Bad JSON documents on the command line: catalogs, profiles, plans and traces each end in `error:` + `hint:`.

Every call drives `residency.cli.main` in-process with a small file written for the case; no traceback, no hang.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import threading

import pytest

from pipelines.catalog import catalog_paths
from residency.cli import main
from residency.device import load_profile, profile_to_dict
from residency.plan import load_plan

PROFILE = ["--profile", "rx-7800-xt"]
PREDICTION = {"frame_ms": 40.0, "first_frame_ms": 60.0, "stall_ms": 1.0, "copy_ms": 5.0, "compute_ms": 35.0,
              "link_bytes_per_frame": 1024, "peak_bytes": {"slots": 1024}, "lower_bound_ms": 30.0,
              "quality_loss": 0.0}
# Two frames of two blocks as the telemetry writes them: a copy then compute, a counter per frame.
TRACE = {
    "traceEvents": [
        {"name": "dit.blocks.0", "cat": "copy", "ph": "X", "pid": 1, "tid": 2, "ts": 0.0, "dur": 2.0,
         "args": {"frame": 0, "bytes": 1024}},
        {"name": "dit.blocks.0", "cat": "compute", "ph": "X", "pid": 1, "tid": 1, "ts": 2.0, "dur": 5.0,
         "args": {"frame": 0}},
        {"name": "device memory", "ph": "C", "pid": 1, "ts": 0.0, "args": {"bytes": 4096, "peak_bytes": 8192}},
        {"name": "dit.blocks.1", "cat": "compute", "ph": "X", "pid": 1, "tid": 1, "ts": 7.0, "dur": 5.0,
         "args": {"frame": 0}},
        {"name": "dit.blocks.0", "cat": "compute", "ph": "X", "pid": 1, "tid": 1, "ts": 40000.0, "dur": 5.0,
         "args": {"frame": 1}},
        {"name": "device memory", "ph": "C", "pid": 1, "ts": 40000.0, "args": {"bytes": 4096, "peak_bytes": 8192}},
        {"name": "dit.blocks.1", "cat": "compute", "ph": "X", "pid": 1, "tid": 1, "ts": 40005.0, "dur": 5.0,
         "args": {"frame": 1}},
    ],
    "displayTimeUnit": "ms",
    "otherData": {"predicted_frame_ms": 40.0, "residency": {
        "context": {"title": "t", "vram_budget_bytes": 2**30, "frame_budget_ms": 50.0, "video_frames_per_latent": 1},
        "memory": {"slots": 1024}, "prediction": PREDICTION}},
}


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def _clean_refusal(code: int, err: str, *words: str) -> None:
    assert code == 1, err
    assert "error: " in err and "hint: " in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def _catalog() -> dict:
    return json.loads(catalog_paths()["tiny"].read_text())


def _set(doc, value, *keys):
    doc = copy.deepcopy(doc)
    target = doc
    for k in keys[:-1]:
        target = target[k]
    target[keys[-1]] = value
    return doc


# ---------------------------------------------------------------- texts any JSON reader must refuse
HOSTILE_TEXTS = {
    "deep nesting": ("[" * 50_000 + "]" * 50_000, "nested"),
    "an integer of 5,000 digits": ('{"steps": ' + "7" * 5000 + "}", "digits"),
    "NaN": ('{"steps": NaN}', "NaN"),
    "1e999": ('{"steps": 1e999}', "finite"),
    "not JSON": ("{steps: 4}", "not valid JSON"),
    "a list, not an object": ("[1, 2]", "object"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TEXTS))
def test_a_hostile_catalog_text_is_refused_cleanly(tmp_path, capsys, case):
    text, words = HOSTILE_TEXTS[case]
    path = write(tmp_path / "model.json", text)
    _clean_refusal(*_cli(capsys, "plan", str(path), *PROFILE), "model.json", words)


@pytest.mark.parametrize("case", sorted(HOSTILE_TEXTS))
def test_a_hostile_profile_text_is_refused_cleanly(tmp_path, capsys, case):
    text, words = HOSTILE_TEXTS[case]
    path = write(tmp_path / "gpu.json", text)
    _clean_refusal(*_cli(capsys, "plan", "tiny", "--profile", str(path)), "gpu.json", words)


@pytest.mark.parametrize("case", sorted(HOSTILE_TEXTS))
def test_a_hostile_trace_text_is_refused_cleanly(tmp_path, capsys, case):
    text, words = HOSTILE_TEXTS[case]
    path = write(tmp_path / "trace.json", text)
    code, err = _cli(capsys, "dashboard", str(path), "--once")
    _clean_refusal(code, err, "trace.json")
    assert words in err or "Chrome trace" in err


# ---------------------------------------------------------------- catalog fields
CATALOG_FIELDS = {
    "a million steps": ((1_000_000, "steps"), "'steps'"),
    "steps as text": (("4", "steps"), "'steps'"),
    "negative context": ((-5, "context_frames"), "'context_frames'"),
    "tokens as true": ((True, "blocks", 0, "tokens"), "'blocks[0].tokens'"),
    "a dimension of 2^70": (([2**70, 4], "blocks", 0, "tensors", 0, 1), "'blocks[0].tensors[0][1][0]'"),
    "an unknown kv dtype": (("int3", "kv_dtype"), "'kv_dtype'"),
    "a pass naming no block": ((["nope"], "phases", 0, "passes", 0, "blocks"), "'phases[0].passes[0].blocks[0]'"),
    "a phase per fortnight": (("fortnight", "phases", 0, "per"), "'phases[0].per'"),
    "blocks as an object": (({}, "blocks"), "'blocks'"),
    "flops as infinity text": (("inf", "blocks", 0, "flops_per_token"), "'blocks[0].flops_per_token'"),
    "flops of 400 digits": ((10**400, "blocks", 0, "flops_per_token"), "'blocks[0].flops_per_token'"),
}


@pytest.mark.parametrize("case", sorted(CATALOG_FIELDS))
def test_a_bad_catalog_field_is_named(tmp_path, capsys, case):
    (value, *keys), field = CATALOG_FIELDS[case]
    path = write(tmp_path / "model.json", json.dumps(_set(_catalog(), value, *keys)))
    _clean_refusal(*_cli(capsys, "plan", str(path), *PROFILE), "model.json", field)


# ---------------------------------------------------------------- profile fields
PROFILE_FIELDS = {
    "memory of 400 digits": ((10**400, "memory_total_bytes"), "'memory_total_bytes'"),
    "a rate with a unit": (("25 GB/s", "device_memory_gbps"), "'device_memory_gbps'"),
    "a billion threads": ((10**9, "compute_threads"), "'compute_threads'"),
    "threads as true": ((True, "compute_threads"), "'compute_threads'"),
    "schema version true": ((True, "schema_version"), "'schema_version'"),
    "a curve of text": (("fast", "link", "h2d_pinned"), "'link.h2d_pinned'"),
}


@pytest.mark.parametrize("case", sorted(PROFILE_FIELDS))
def test_a_bad_profile_field_is_named(tmp_path, capsys, case):
    (value, *keys), field = PROFILE_FIELDS[case]
    doc = _set(profile_to_dict(load_profile("rx-7800-xt")), value, *keys)
    path = write(tmp_path / "gpu.json", json.dumps(doc))
    _clean_refusal(*_cli(capsys, "plan", "tiny", "--profile", str(path)), "gpu.json", field)


def test_an_over_long_profile_path_is_a_clean_error(tmp_path, capsys):
    _clean_refusal(*_cli(capsys, "plan", "tiny", "--profile", str(tmp_path / ("p" * 300 + ".json"))), "too long")


# ---------------------------------------------------------------- plans applied to a workload
@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["plan", "tiny", *PROFILE, "--vram", "64MiB", "-o", str(path)]) in (0, 3)
    load_plan(path)
    return json.loads(path.read_text())


@pytest.fixture()
def plan_doc(planned) -> dict:
    return copy.deepcopy(planned)


def _run_with_plan(tmp_path, capsys, doc) -> tuple[int, str]:
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "start.png")
    path = write(tmp_path / "mine.json", json.dumps(doc))
    out = tmp_path / "o.gif"
    result = _cli(capsys, "run", "tiny", "--image", str(tmp_path / "start.png"), "--plan", str(path),
                  "--frames", "1", "-o", str(out))
    assert not out.exists()
    return result


# One run costs ~2 s (it builds the model before reading the plan): the full list of bad plan fields is
# checked against the schema in test_plan_schema; here two show that `run` ends in the same clean error.
@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(steps="abc"), "'steps'"),
    (lambda d: d["budget"].update(vram_bytes="8MiB"), "'budget.vram_bytes'"),
])
def test_run_refuses_a_plan_with_a_bad_field(tmp_path, capsys, plan_doc, mutate, field):
    mutate(plan_doc)
    _clean_refusal(*_run_with_plan(tmp_path, capsys, plan_doc), "mine.json", field)


def test_run_refuses_a_plan_whose_block_names_differ_from_the_model(tmp_path, capsys, plan_doc):
    plan_doc["blocks"][0]["name"] = "no.such.block"
    _clean_refusal(*_run_with_plan(tmp_path, capsys, plan_doc), "unknown block 'no.such.block'")


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d["blocks"][-1].update(name="renamed"), "unknown block 'renamed'"),
    (lambda d: d["blocks"].pop(), "missing block"),
    (lambda d: d["blocks"].append(dict(d["blocks"][0])), "named twice"),
    (lambda d: d["blocks"].reverse(), "another order"),
])
def test_the_simulator_refuses_a_plan_whose_block_names_differ(plan_doc, mutate, words):
    from residency.device import load_profile as profile
    from residency.errors import ResidencyError
    from residency.plan import plan_from_dict
    from residency.simulate import simulate
    from residency.workload import load_workload_file

    mutate(plan_doc)
    plan = plan_from_dict(plan_doc, "mine.json")
    with pytest.raises(ResidencyError, match=words) as e:
        simulate(load_workload_file(catalog_paths()["tiny"]), plan, profile("rx-7800-xt"))
    assert e.value.hint


# ---------------------------------------------------------------- traces
TRACE_FIELDS = {
    "events not a list": (lambda d: d.update(traceEvents={"a": 1}), "traceEvents"),
    "an event not an object": (lambda d: d["traceEvents"].insert(0, 5), "'traceEvents[0]'"),
    "a negative duration": (lambda d: d["traceEvents"][0].update(dur=-1.0), "'traceEvents[0].dur'"),
    "a duration as text": (lambda d: d["traceEvents"][0].update(dur="3 ms"), "'traceEvents[0].dur'"),
    "a missing timestamp": (lambda d: d["traceEvents"][0].pop("ts"), "'traceEvents[0].ts'"),
    "an unknown track": (lambda d: d["traceEvents"][0].update(cat="gpu"), "traceEvents[0] is not an event residency writes"),
    "a frame as text": (lambda d: d["traceEvents"][1]["args"].update(frame="0"), "'traceEvents[1].args.frame'"),
    "copy bytes negative": (lambda d: d["traceEvents"][0]["args"].update(bytes=-8), "'traceEvents[0].args.bytes'"),
    "memory as a string": (lambda d: d["traceEvents"][2]["args"].update(bytes="1 GB"), "'traceEvents[2].args.bytes'"),
    "memory by kind as text": (lambda d: d["otherData"]["residency"]["memory"].update(slots="big"),
                               "'otherData.residency.memory.slots'"),
    "a context budget of zero": (lambda d: d["otherData"]["residency"]["context"].update(vram_budget_bytes=0),
                                 "'otherData.residency.context.vram_budget_bytes'"),
    "a context without a title": (lambda d: d["otherData"]["residency"]["context"].pop("title"),
                                  "'otherData.residency.context.title'"),
    "a prediction missing a figure": (lambda d: d["otherData"]["residency"]["prediction"].pop("frame_ms"),
                                      "'otherData.residency.prediction.frame_ms'"),
    "a predicted frame time as text": (lambda d: d["otherData"].update(predicted_frame_ms="40"),
                                       "'otherData.predicted_frame_ms'"),
}


@pytest.mark.parametrize("case", sorted(TRACE_FIELDS))
def test_dashboard_names_the_bad_trace_field(tmp_path, capsys, case):
    mutate, field = TRACE_FIELDS[case]
    doc = copy.deepcopy(TRACE)
    mutate(doc)
    path = write(tmp_path / "trace.json", json.dumps(doc))
    _clean_refusal(*_cli(capsys, "dashboard", str(path), "--once"), "trace.json", field)


def test_dashboard_renders_the_well_formed_trace(tmp_path, capsys):
    path = write(tmp_path / "trace.json", json.dumps(TRACE))
    code, _ = _cli(capsys, "dashboard", str(path), "--once")
    assert code == 0


def test_a_nan_duration_is_refused(tmp_path, capsys):
    text = json.dumps(TRACE).replace('"dur": 2.0', '"dur": NaN', 1)
    assert "NaN" in text
    _clean_refusal(*_cli(capsys, "dashboard", str(write(tmp_path / "trace.json", text)), "--once"), "NaN")


# ---------------------------------------------------------------- FIFOs: refused at once, never waited on
def _returns_quickly(argv, seconds: float = 20.0) -> int:
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(main(argv)), daemon=True)
    worker.start()
    worker.join(timeout=seconds)
    if worker.is_alive():
        fifo = next(a for a in argv if a.endswith("fifo.json"))
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the blocked reader
        pytest.fail(f"{argv[0]} blocked on a FIFO")
    return result[0]


def test_dashboard_refuses_a_fifo_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    code = _returns_quickly(["dashboard", str(fifo), "--once"])
    _clean_refusal(code, capsys.readouterr().err, "regular file")


def test_run_refuses_a_fifo_plan_without_blocking(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "start.png")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    code = _returns_quickly(["run", "tiny", "--image", str(tmp_path / "start.png"), "--plan", str(fifo),
                             "--frames", "1", "-o", str(tmp_path / "o.gif")])
    _clean_refusal(code, capsys.readouterr().err, "regular file")


def test_plan_refuses_a_fifo_profile_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    code = _returns_quickly(["plan", "tiny", "--profile", str(fifo)])
    _clean_refusal(code, capsys.readouterr().err, "regular file")


@pytest.mark.parametrize(("argv", "exit_code"), [
    (["plan", "/nonexistent", "--json"], 1), (["inspect", "/nonexistent", "--json"], 1),
    (["plan", "tiny", "--profile", "/nonexistent.json", "--json"], 1),
    (["plan", "tiny", "--vram", "bogus", "--json"], 2),  # argparse's own
    (["plan", "tiny", "--bogus", "--json"], 2)])
def test_with_json_an_error_is_also_a_document_on_stdout(capsys, argv, exit_code):
    """stdout was empty: a script parsing it read nothing and could not tell the error."""
    code = main(argv)
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert code == doc["exit_code"] == exit_code and doc["error"] in err and doc["hint"] in err
