"""The shipped plan JSON Schema and plan_from_dict accept and refuse the same documents; planner output is valid."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest

jsonschema = pytest.importorskip("jsonschema")

from residency.cli import main  # noqa: E402
from residency.errors import ResidencyError  # noqa: E402
from residency.formats import FORMATS  # noqa: E402
from residency.plan import load_plan, plan_to_dict  # noqa: E402
from residency.plan.plan import (  # noqa: E402
    COMPUTE_DTYPES,
    COPY_MODES,
    DEQUANT_ON,
    EXEC_MODES,
    LIFETIMES,
    MAX_CONTEXT_FRAMES,
    MAX_PLAN_BYTES,
    MAX_PREFETCH_DEPTH,
    MAX_STEPS,
    PLACEMENTS,
)
from residency.plan.plan_io import PLAN_SCHEMA_PATH  # noqa: E402
from residency.workload.spec import KV_DTYPE_BYTES  # noqa: E402

SCHEMA = json.loads(PLAN_SCHEMA_PATH.read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def _plan_file(tmp_path, model: str, profile: str, *extra: str) -> dict:
    path = tmp_path / f"{model}-{profile}.json"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["plan", model, "--profile", profile, "-o", str(path), *extra])
    assert code in (0, 3) and path.exists()
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    return _plan_file(tmp_path_factory.mktemp("plan"), "tiny", "rx-7800-xt")


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def mutate(d):
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return mutate


def _drop(*keys):
    def mutate(d):
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return mutate


def _only_required(d):
    for k in ("execution", "kv_dtype", "steps", "context_frames", "prediction", "notes"):
        d.pop(k)
    d["blocks"] = [{k: b[k] for k in ("name", "placement", "format")} for b in d["blocks"]]


ACCEPTED = {
    "as written": lambda d: None,
    "no frame budget": _set("budget", "frame_ms", None),
    "frame budget absent": _drop("budget", "frame_ms"),
    "no prediction": _set("prediction", None),
    "only the required fields": _only_required,
    "one step": _set("steps", 1),
    "the most steps": _set("steps", MAX_STEPS),
    "steps as 4.0": _set("steps", 4.0),
    "no context": _set("context_frames", 0),
    "the most context": _set("context_frames", MAX_CONTEXT_FRAMES),
    "no prefetch": _set("execution", "prefetch_depth", 0),
    "a one-byte budget": _set("budget", "vram_bytes", 1),
    "the largest budget": _set("budget", "vram_bytes", MAX_PLAN_BYTES),
    "fp8 KV": _set("kv_dtype", "fp8"),
    "no notes": _set("notes", []),
    "an empty execution": _set("execution", {}),
    "an empty peak": _set("prediction", "peak_bytes", {}),
    "schema version 1, blocks without modules and tensors": lambda d: (
        d.update(schema_version=1), [(b.pop("modules"), b.pop("tensors")) for b in d["blocks"]]),
    "a block in no module": _set("blocks", 0, "modules", []),
    "a block without tensors": _set("blocks", 0, "tensors", []),
    "a compiled block": _set("blocks", 0, "exec_mode", "compiled"),
    "a graphed block": _set("blocks", 0, "exec_mode", "graphed"),
    "an eager block written out": _set("blocks", 0, "exec_mode", "eager"),
}

REFUSED = {
    "steps as text": _set("steps", "abc"),
    "notes not a list": _set("notes", 5),
    "a note not text": _set("notes", [5]),
    "vram with a unit": _set("budget", "vram_bytes", "8MiB"),
    "unknown KV dtype": _set("kv_dtype", "int3"),
    "negative context": _set("context_frames", -5),
    "a million steps": _set("steps", 1_000_000),
    "zero steps": _set("steps", 0),
    "fractional steps": _set("steps", 4.5),
    "steps as true": _set("steps", True),
    "too much context": _set("context_frames", MAX_CONTEXT_FRAMES + 1),
    "zero budget": _set("budget", "vram_bytes", 0),
    "budget past 2^53": _set("budget", "vram_bytes", MAX_PLAN_BYTES + 1),
    "fractional budget": _set("budget", "vram_bytes", 1.5),
    "budget of 400 digits": _set("budget", "vram_bytes", 10**400),
    "zero frame budget": _set("budget", "frame_ms", 0),
    "negative frame budget": _set("budget", "frame_ms", -1.0),
    "frame budget as text": _set("budget", "frame_ms", "fast"),
    "unknown budget field": _set("budget", "fps", 30),
    "budget missing bytes": _drop("budget", "vram_bytes"),
    "unknown placement": _set("blocks", 0, "placement", "on-the-moon"),
    "unknown format": _set("blocks", 0, "format", "Q9_9"),
    "unknown compute dtype": _set("blocks", 0, "compute_dtype", "fp64"),
    "unknown lifetime": _set("blocks", 0, "lifetime", "forever"),
    "unknown dequant side": _set("blocks", 0, "dequant_on", "gpu"),
    "unknown exec mode": _set("blocks", 0, "exec_mode", "jit"),
    "exec mode null": _set("blocks", 0, "exec_mode", None),
    "unknown block field": _set("blocks", 0, "colour", "red"),
    "block without a format": _drop("blocks", 0, "format"),
    "block with an empty name": _set("blocks", 0, "name", ""),
    "block name a number": _set("blocks", 0, "name", 7),
    "block not an object": _set("blocks", 0, "dit.blocks.0"),
    "no blocks": _set("blocks", []),
    "blocks as text": _set("blocks", "all"),
    "unknown copy mode": _set("execution", "copy_mode", "maybe"),
    "prefetch too deep": _set("execution", "prefetch_depth", MAX_PREFETCH_DEPTH + 1),
    "negative prefetch": _set("execution", "prefetch_depth", -1),
    "pinned as text": _set("execution", "pinned", "yes"),
    "pinned as 1": _set("execution", "pinned", 1),
    "negative host sync": _set("execution", "host_sync_per_onload_us", -1),
    # read, and a run printed a 300-digit prediction
    "host sync past a second": _set("execution", "host_sync_per_onload_us", 1e300),
    "execution null": _set("execution", None),
    "unknown top-level field": _set("colour", "red"),
    "missing model": _drop("model"),
    "missing budget": _drop("budget"),
    "missing blocks": _drop("blocks"),
    "empty model name": _set("model", ""),
    "model as a number": _set("model", 5),
    "schema version 3": _set("schema_version", 3),
    "schema version 0": _set("schema_version", 0),
    "modules as text": _set("blocks", 0, "modules", "dit.blocks.0"),
    "an empty module path": _set("blocks", 0, "modules", [""]),
    "a module path a number": _set("blocks", 0, "modules", [0]),
    "tensors as an object": _set("blocks", 0, "tensors", {"w": [4, 4]}),
    "an empty tensor name": _set("blocks", 0, "tensors", ["attn.qkv.weight", ""]),
    "schema version true": _set("schema_version", True),
    "missing schema version": _drop("schema_version"),
    "prediction as text": _set("prediction", "fast"),
    "prediction missing a figure": _drop("prediction", "frame_ms"),
    "prediction negative ms": _set("prediction", "stall_ms", -1.0),
    "prediction negative peak": _set("prediction", "peak_bytes", "slots", -1),
    "prediction fractional peak": _set("prediction", "peak_bytes", "slots", 1.5),
    "prediction unknown field": _set("prediction", "fps", 3),
    "prediction loss as text": _set("prediction", "quality_loss", "low"),
    "prediction negative link bytes": _set("prediction", "link_bytes_per_frame", -1),
    "kv dtype null": _set("kv_dtype", None),
}

# Documents that are not JSON at all: both sides refuse them before any field is looked at.
NOT_JSON = {
    "frame budget NaN": ('"frame_ms": null', '"frame_ms": NaN'),
    "frame budget Infinity": ('"frame_ms": null', '"frame_ms": Infinity'),
    "frame budget 1e999": ('"frame_ms": null', '"frame_ms": 1e999'),
}


def _ours_accepts(tmp_path, text: str) -> bool:
    path = tmp_path / "case.json"
    path.write_text(text)
    try:
        load_plan(path)
    except ResidencyError as e:
        assert "case.json" in e.message and e.hint
        return False
    return True


def _schema_accepts(text: str) -> bool:
    def refuse(literal):
        raise ValueError(literal)
    try:
        doc = json.loads(text, parse_constant=refuse)
    except ValueError:
        return False
    if doc != doc or "e999" in text:  # 1e999 parses to inf in Python; it is no JSON number
        return False
    return VALIDATOR.is_valid(doc)


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_schema_and_reader_both_accept(tmp_path, good, case):
    doc = copy.deepcopy(good)
    ACCEPTED[case](doc)
    text = json.dumps(doc)
    assert (_ours_accepts(tmp_path, text), _schema_accepts(text)) == (True, True)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_schema_and_reader_both_refuse(tmp_path, good, case):
    doc = copy.deepcopy(good)
    REFUSED[case](doc)
    text = json.dumps(doc)
    assert (_ours_accepts(tmp_path, text), _schema_accepts(text)) == (False, False)


@pytest.mark.parametrize("case", sorted(NOT_JSON))
def test_non_finite_numbers_are_refused_by_both(tmp_path, good, case):
    old, new = NOT_JSON[case]
    doc = copy.deepcopy(good)
    doc["budget"]["frame_ms"] = None
    text = json.dumps(doc).replace(old, new)
    assert new in text
    assert (_ours_accepts(tmp_path, text), _schema_accepts(text)) == (False, False)


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_enums_are_the_codes_own_lists():
    block = SCHEMA["$defs"]["block"]["properties"]
    assert block["placement"]["enum"] == list(PLACEMENTS)
    assert block["format"]["enum"] == list(FORMATS)
    assert block["compute_dtype"]["enum"] == list(COMPUTE_DTYPES)
    assert block["lifetime"]["enum"] == list(LIFETIMES)
    assert block["dequant_on"]["enum"] == list(DEQUANT_ON)
    assert block["exec_mode"]["enum"] == list(EXEC_MODES)
    top = SCHEMA["properties"]
    assert top["execution"]["properties"]["copy_mode"]["enum"] == list(COPY_MODES)
    assert top["kv_dtype"]["enum"] == list(KV_DTYPE_BYTES)
    assert (top["steps"]["maximum"], top["context_frames"]["maximum"]) == (MAX_STEPS, MAX_CONTEXT_FRAMES)
    assert top["execution"]["properties"]["prefetch_depth"]["maximum"] == MAX_PREFETCH_DEPTH


@pytest.mark.parametrize("model, profile", [("tiny", "rtx-3060-12gb"), ("lucid-500m", "rx-7800-xt"),
                                            ("flux-schnell", "rtx-4090")])
def test_every_plan_the_planner_writes_is_valid(tmp_path, model, profile):
    doc = _plan_file(tmp_path, model, profile)
    errors = [e.message for e in VALIDATOR.iter_errors(doc)]
    assert errors == []


def test_every_policys_plan_is_valid_and_reads_back():
    from pipelines.catalog import catalog_paths
    from policies import PlanRequest, registry
    from residency.device import resolve_profile
    from residency.plan import Budget, plan_from_dict
    from residency.workload import load_workload_file

    workload = load_workload_file(catalog_paths()["tiny"])
    profile = resolve_profile("rx-7800-xt")
    req = PlanRequest(workload, profile, Budget(profile.memory_usable_bytes // 8, 100.0))
    for name, policy in registry().items():
        plan = policy(req)
        doc = json.loads(json.dumps(plan_to_dict(plan)))
        assert [e.message for e in VALIDATOR.iter_errors(doc)] == [], name
        assert plan_from_dict(doc, name) == plan


def test_written_plans_name_each_blocks_modules_and_tensors(good):
    from pipelines.catalog import catalog_paths
    from residency.workload import load_workload_file

    workload = load_workload_file(catalog_paths()["tiny"])
    assert good["schema_version"] == 2
    for block in good["blocks"]:
        spec = workload.by_name[block["name"]]
        assert block["modules"] == list(spec.modules or (spec.name,))
        assert block["tensors"] == [n for n, _ in spec.tensors] and block["tensors"]


def test_modules_and_tensors_survive_a_round_trip(tmp_path, good):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(good))
    plan = load_plan(path)
    assert [list(b.modules) for b in plan.blocks] == [b["modules"] for b in good["blocks"]]
    assert [list(b.tensors) for b in plan.blocks] == [b["tensors"] for b in good["blocks"]]


def test_exec_mode_is_written_only_when_not_eager(tmp_path):
    import dataclasses

    good = _plan_file(tmp_path, "tiny", "rx-7800-xt", "--exec-mode", "eager")
    assert all("exec_mode" not in b for b in good["blocks"])  # eager plans: the JSON of before exec_mode
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(good))
    plan = load_plan(path)
    assert good.pop("holds_budget") is plan.holds_budget  # save_plan adds it for a reader; not part of the plan
    assert json.loads(json.dumps(plan_to_dict(plan))) == good
    compiled = dataclasses.replace(plan, blocks=(dataclasses.replace(plan.blocks[0], exec_mode="compiled"),
                                                 *plan.blocks[1:]))
    doc = json.loads(json.dumps(plan_to_dict(compiled)))
    assert doc["blocks"][0]["exec_mode"] == "compiled" and "exec_mode" not in doc["blocks"][1]
    assert VALIDATOR.is_valid(doc)
    path.write_text(json.dumps(doc))
    assert load_plan(path) == compiled
