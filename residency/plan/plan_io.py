"""Plan <-> JSON: a versioned document, written atomically, read back with errors naming file and field.

Grouped by block so a user can read (and diff) what the planner decided.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from residency.errors import ResidencyError
from residency.formats import FORMATS
from residency.jsonfile import read_json
from residency.plan.plan import (
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
    BlockPlan,
    Budget,
    Execution,
    Plan,
    Prediction,
)
from residency.units import BACKENDS, MAX_FRAME_MS, MIN_FRAME_MS
from residency.validate import Reader, show
from residency.workload.spec import KV_DTYPE_BYTES

PLAN_SCHEMA_VERSION = 2  # 2: blocks carry `modules` and `tensors`
# Versions read: a version 1 plan (no module paths, no tensor names) is decided the same way, so it still runs.
READABLE_SCHEMA_VERSIONS = (1, 2)
# The JSON Schema (draft 2020-12) of the plan document; plan_from_dict accepts exactly what it accepts.
PLAN_SCHEMA_PATH = Path(__file__).with_name("plan.schema.json")


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as a JSON-ready dict (schema PLAN_SCHEMA_VERSION); plan_from_dict reads it back."""
    doc = {
        "schema_version": PLAN_SCHEMA_VERSION,
        "model": plan.model,
        "workload_fingerprint": plan.workload_fingerprint,
        "profile": plan.profile,
        "profile_fingerprint": plan.profile_fingerprint,
        **({"profile_backend": plan.profile_backend} if plan.profile_backend else {}),
        "policy": plan.policy,
        "budget": asdict(plan.budget),
        "execution": asdict(plan.execution),
        "kv_dtype": plan.kv_dtype,
        "steps": plan.steps,
        "context_frames": plan.context_frames,
        "blocks": [_block_dict(b) for b in plan.blocks],
        "prediction": prediction_to_dict(plan.prediction) if plan.prediction else None,
        "notes": list(plan.notes),
    }
    doc["digest"] = plan_digest(doc)
    return doc


# What a hand edit may change without touching what the plan decides: its digest leaves them out.
_NOT_DIGESTED = ("prediction", "notes", "digest", "profile_backend", "holds_budget", "verdict", "policies")


def plan_digest(doc: dict[str, Any]) -> str:
    """A hash of what a plan document decides (every field but its prediction and notes), written beside them: a
    plan edited by hand afterwards (`"steps": 64`, a block made resident) no longer matches it, and its prediction,
    made for the plan as written, is left out when it is read."""
    body = {k: v for k, v in doc.items() if k not in _NOT_DIGESTED}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _block_dict(b: BlockPlan) -> dict[str, Any]:
    """A block as the plan JSON holds it; exec_mode only when not "eager" (eager plans read as before)."""
    doc = {**asdict(b), "modules": list(b.modules), "tensors": list(b.tensors)}
    if b.exec_mode == "eager":
        del doc["exec_mode"]
    return doc


_HINT = "re-create the plan with `residency plan -o`"
_TOP_REQUIRED = ("schema_version", "model", "workload_fingerprint", "profile", "profile_fingerprint", "policy",
                 "budget", "blocks")
_TOP_KNOWN = (*_TOP_REQUIRED, "execution", "kv_dtype", "steps", "context_frames", "prediction", "notes", "digest", "profile_backend",
              *("holds_budget", "verdict", "policies"))  # what `plan --json` adds to the document: read past, not kept
# The bound every figure of a device profile has (residency.device.profile_reader.MAX_QUANTITY; plan may not import
# device): a peer's host wait is a profile's launch cost times a count; unbounded, 1e300 was read, and a run printed
# a 300-digit prediction
MAX_HOST_SYNC_US = 1e30
_PREDICTION_MS = ("frame_ms", "first_frame_ms", "stall_ms", "copy_ms", "compute_ms", "lower_bound_ms")


def plan_from_dict(doc: Any, source: str = "<plan>") -> Plan:
    """A Plan from a parsed plan document, every field checked as plan.schema.json describes it."""
    r = Reader(source, _HINT, expects="a plan")
    r.obj(doc, "", _TOP_KNOWN)
    version = r.need(doc, "schema_version")
    if isinstance(version, bool) or version not in READABLE_SCHEMA_VERSIONS:
        raise r.fail("schema_version", f"= {show(version)}: this version of residency reads plans of "
                     f"schema_version {' or '.join(map(str, READABLE_SCHEMA_VERSIONS))}",
                     hint="re-create the plan with this version of `residency plan -o`")
    text = {k: r.string(r.need(doc, k), k, non_empty=True)
            for k in ("model", "workload_fingerprint", "profile", "profile_fingerprint", "policy")}
    budget = _budget(r, r.need(doc, "budget"))
    listed = r.items(r.need(doc, "blocks"), "blocks", min_items=1)
    blocks = tuple(_block(r, b, f"blocks[{i}]") for i, b in enumerate(listed))
    prediction = r.optional(doc, "prediction", None)
    digest = r.optional(doc, "digest", None)
    if digest is not None and r.string(digest, "digest", non_empty=True) != plan_digest(doc):
        prediction = None  # edited since written: its figures are another plan's (run predicts it again)
    if "verdict" in doc and not isinstance(doc["verdict"], str):
        raise r.fail("verdict", f"= {show(doc['verdict'])} is not a string",
                     hint="it is what `plan --json` says of the plan; read past on load: leave it as written or "
                          "remove it")
    if "holds_budget" in doc and not isinstance(doc["holds_budget"], bool):
        raise r.fail("holds_budget", f"= {show(doc['holds_budget'])} is not true or false",
                     hint="it is what `plan --json` says of the budget; leave it out or as written")
    if "policies" in doc and not isinstance(doc["policies"], dict):
        raise r.fail("policies", f"= {show(doc['policies'])} is not an object",
                     hint="it is `plan --json --policy all`'s plan of each policy; leave it out or as written")
    notes = r.items(r.optional(doc, "notes", []), "notes")
    return Plan(
        **text,
        profile_backend=r.choice(r.optional(doc, "profile_backend", ""), "profile_backend", ("", *BACKENDS)),
        budget=budget,
        blocks=blocks,
        execution=_execution(r, r.optional(doc, "execution", {})),
        kv_dtype=r.choice(r.optional(doc, "kv_dtype", "bf16"), "kv_dtype", KV_DTYPE_BYTES),
        steps=r.integer(r.optional(doc, "steps", 4), "steps", 1, MAX_STEPS, unit="denoise steps"),
        context_frames=r.integer(r.optional(doc, "context_frames", 0), "context_frames", 0, MAX_CONTEXT_FRAMES,
                                 unit="latent frames"),
        prediction=None if prediction is None else prediction_from_dict(r, prediction, "prediction"),
        notes=tuple(r.string(n, f"notes[{i}]") for i, n in enumerate(notes)),
    )


def _budget(r: Reader, value: Any) -> Budget:
    doc = r.obj(value, "budget", ("vram_bytes", "frame_ms"), required=("vram_bytes",))
    frame_ms = r.optional(doc, "frame_ms", None)
    return Budget(vram_bytes=r.integer(doc["vram_bytes"], "budget.vram_bytes", 1, MAX_PLAN_BYTES, unit="bytes"),
                  frame_ms=None if frame_ms is None else r.number(frame_ms, "budget.frame_ms", MIN_FRAME_MS,
                                                                  maximum=MAX_FRAME_MS, unit="ms per latent frame"))


def _block(r: Reader, value: Any, path: str) -> BlockPlan:
    doc = r.obj(value, path, _BLOCK_FIELDS, required=("name", "placement", "format"))
    return BlockPlan(
        name=r.string(doc["name"], f"{path}.name", non_empty=True),
        placement=r.choice(doc["placement"], f"{path}.placement", PLACEMENTS),
        format=r.choice(doc["format"], f"{path}.format", FORMATS),
        compute_dtype=r.choice(r.optional(doc, "compute_dtype", "bf16"), f"{path}.compute_dtype", COMPUTE_DTYPES),
        lifetime=r.choice(r.optional(doc, "lifetime", "session"), f"{path}.lifetime", LIFETIMES),
        dequant_on=r.choice(r.optional(doc, "dequant_on", "compute"), f"{path}.dequant_on", DEQUANT_ON),
        modules=_names(r, r.optional(doc, "modules", []), f"{path}.modules"),
        tensors=_names(r, r.optional(doc, "tensors", []), f"{path}.tensors"),
        exec_mode=r.choice(r.optional(doc, "exec_mode", "eager"), f"{path}.exec_mode", EXEC_MODES),
    )


def _names(r: Reader, value: Any, path: str) -> tuple[str, ...]:
    return tuple(r.string(n, f"{path}[{i}]", non_empty=True) for i, n in enumerate(r.items(value, path)))


def _execution(r: Reader, value: Any) -> Execution:
    doc = r.obj(value, "execution", _EXECUTION_FIELDS)
    flags = {k: r.boolean(doc[k], f"execution.{k}") for k in
             ("lookahead_from_compute_start", "pinned", "per_tensor_copies") if k in doc}
    return Execution(
        copy_mode=r.choice(r.optional(doc, "copy_mode", "async"), "execution.copy_mode", COPY_MODES),
        prefetch_depth=r.integer(r.optional(doc, "prefetch_depth", 1), "execution.prefetch_depth", 0,
                                 MAX_PREFETCH_DEPTH, unit="blocks"),
        host_sync_per_onload_us=r.number(r.optional(doc, "host_sync_per_onload_us", 0.0),
                                         "execution.host_sync_per_onload_us", 0.0, maximum=MAX_HOST_SYNC_US,
                                         unit="microseconds"),
        **flags,
    )


# Figures a prediction may leave uncomputed (NaN in memory, null in JSON, which has no NaN): the lower bound of a
# plan re-predicted without it (simulate(..., bound=False): the closed loop's re-predictions, a policy's candidates)
_PREDICTION_OPTIONAL_MS = ("lower_bound_ms",)


def prediction_to_dict(prediction: Prediction) -> dict[str, Any]:
    """The simulator's figures as JSON: an uncomputed figure (NaN) as null."""
    doc = asdict(prediction)
    for k in _PREDICTION_OPTIONAL_MS:
        if not math.isfinite(doc[k]):
            doc[k] = None
    return doc


def prediction_from_dict(r: Reader, value: Any, path: str) -> Prediction:
    """The simulator's figures as a plan or a trace stores them (every field present, none negative; the lower
    bound may be null: not computed, read back as NaN)."""
    doc = r.obj(value, path, _PREDICTION_FIELDS, required=_PREDICTION_FIELDS)
    peak = r.obj(doc["peak_bytes"], f"{path}.peak_bytes")
    return Prediction(
        **{k: math.nan if doc[k] is None and k in _PREDICTION_OPTIONAL_MS
           else r.number(doc[k], f"{path}.{k}", 0.0, unit="ms") for k in _PREDICTION_MS},
        link_bytes_per_frame=r.integer(doc["link_bytes_per_frame"], f"{path}.link_bytes_per_frame", 0,
                                       MAX_PLAN_BYTES, unit="bytes"),
        peak_bytes={k: r.integer(v, f"{path}.peak_bytes.{k}", 0, MAX_PLAN_BYTES, unit="bytes")
                    for k, v in peak.items()},
        quality_loss=r.number(doc["quality_loss"], f"{path}.quality_loss", 0.0),
    )


_BLOCK_FIELDS = tuple(f.name for f in fields(BlockPlan))
_EXECUTION_FIELDS = tuple(f.name for f in fields(Execution))
_PREDICTION_FIELDS = tuple(f.name for f in fields(Prediction))


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    """Write `plan` as JSON (the schema of PLAN_SCHEMA_PATH) to `path` atomically; returns the path.

    Raises ResidencyError naming the path when it cannot be written."""
    from residency.atomic_file import atomic_output

    if not isinstance(plan, Plan):
        raise ResidencyError(f"save_plan writes a Plan, not a {type(plan).__name__}",
                             hint="give the plan residency.make_plan or runtime.plan returns")
    doc = plan_to_dict(plan)
    plan_from_dict(doc, f"the plan to save as {path}")  # what load_plan would refuse is not written
    doc["holds_budget"] = plan.holds_budget  # for a reader of the file, as `plan --json` says it; read past on load
    text = json.dumps(doc, indent=1) + "\n"
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return path


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a plan written by save_plan (or `residency plan -o`), every field checked.

    Raises ResidencyError naming the file and the field for a missing, unreadable or invalid plan. The plan
    is not yet tied to a model: Plan.check_matches(workload) (the Runtime calls it) refuses another one."""
    doc = read_json(path, "the plan", "give a file written by `residency plan -o`")
    return plan_from_dict(doc, str(path))
