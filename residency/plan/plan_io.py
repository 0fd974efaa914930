"""Plan <-> JSON: a versioned document, written atomically, read back with errors naming file and field.

Grouped by block so a user can read (and diff) what the planner decided.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from residency.errors import ResidencyError
from residency.jsonfile import read_json
from residency.plan.plan import BlockPlan, Budget, Execution, Plan, Prediction

PLAN_SCHEMA_VERSION = 1


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return {
        "schema_version": PLAN_SCHEMA_VERSION,
        "model": plan.model,
        "workload_fingerprint": plan.workload_fingerprint,
        "profile": plan.profile,
        "profile_fingerprint": plan.profile_fingerprint,
        "policy": plan.policy,
        "budget": asdict(plan.budget),
        "execution": asdict(plan.execution),
        "kv_dtype": plan.kv_dtype,
        "steps": plan.steps,
        "context_frames": plan.context_frames,
        "blocks": [asdict(b) for b in plan.blocks],
        "prediction": asdict(plan.prediction) if plan.prediction else None,
        "notes": list(plan.notes),
    }


def _build(cls, doc: Any, source: str, where: str):
    if not isinstance(doc, dict):
        raise ResidencyError(f"{source}: {where}: expected an object, got {doc!r}",
                             hint="the file is not a plan written by `residency plan -o`")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(doc) - names)
    if unknown:
        raise ResidencyError(f"{source}: {where}: unknown field {unknown[0]!r}",
                             hint=f"known fields: {', '.join(sorted(names))}")
    try:
        return cls(**doc)
    except TypeError as e:
        raise ResidencyError(f"{source}: {where}: {e}", hint="re-create the plan with `residency plan -o`") from None
    except ResidencyError as e:
        raise ResidencyError(f"{source}: {where}: {e.message}", hint=e.hint) from None


def plan_from_dict(doc: Any, source: str = "<plan>") -> Plan:
    if not isinstance(doc, dict):
        raise ResidencyError(f"{source}: expected a JSON object", hint="give a file written by `residency plan -o`")
    version = doc.get("schema_version")
    if version != PLAN_SCHEMA_VERSION:
        raise ResidencyError(f"{source}: schema_version {version!r} is not {PLAN_SCHEMA_VERSION}",
                             hint="re-create the plan with this version of `residency plan -o`")
    required = ("model", "workload_fingerprint", "profile", "profile_fingerprint", "policy", "budget", "blocks")
    for key in required:
        if key not in doc:
            raise ResidencyError(f"{source}: missing field {key!r}", hint="re-create the plan with `residency plan -o`")
    blocks = doc["blocks"]
    if not isinstance(blocks, list) or not blocks:
        raise ResidencyError(f"{source}: field 'blocks' must be a non-empty list")
    prediction = doc.get("prediction")
    return Plan(
        model=str(doc["model"]),
        workload_fingerprint=str(doc["workload_fingerprint"]),
        profile=str(doc["profile"]),
        profile_fingerprint=str(doc["profile_fingerprint"]),
        policy=str(doc["policy"]),
        budget=_build(Budget, doc["budget"], source, "budget"),
        blocks=tuple(_build(BlockPlan, b, source, f"blocks[{i}]") for i, b in enumerate(blocks)),
        execution=_build(Execution, doc.get("execution", {}), source, "execution"),
        kv_dtype=str(doc.get("kv_dtype", "bf16")),
        steps=int(doc.get("steps", 4)),
        context_frames=int(doc.get("context_frames", 0)),
        prediction=_build(Prediction, prediction, source, "prediction") if prediction else None,
        notes=tuple(doc.get("notes", ())),
    )


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    from residency.checkpoint.atomic import atomic_output

    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(plan_to_dict(plan), indent=1) + "\n")
    return path


def load_plan(path: str | os.PathLike[str]) -> Plan:
    doc = read_json(path, "the plan", "give a file written by `residency plan -o`")
    return plan_from_dict(doc, str(path))
