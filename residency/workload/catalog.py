"""Catalog documents (JSON) <-> Workload, with validation that names the file and the field.

A catalog entry is the inventory of a real architecture plus its call schedule, committed as data.
"""

from __future__ import annotations

import os
from typing import Any

from residency.errors import ResidencyError
from residency.jsonfile import read_json
from residency.workload.spec import BlockSpec, PassSpec, PhaseSpec, Workload

CATALOG_SCHEMA_VERSION = 1
_BLOCK_NUMBERS = ("fixed_flops", "flops_per_token", "self_attn_flops_per_token_pair",
                  "context_attn_flops_per_token_pair", "activation_bytes_per_token")
_BLOCK_INTS = ("context_tokens_per_frame", "kv_channels_per_token", "ops_per_call", "kernels_per_call",
               "activation_elements_per_call")


def _err(source: str, where: str, problem: str, hint: str | None = None) -> ResidencyError:
    return ResidencyError(f"{source}: {where}: {problem}",
                          hint or "regenerate the catalog with tools/gen_catalog.py")


def _need(doc: dict, key: str, source: str, where: str) -> Any:
    if not isinstance(doc, dict) or key not in doc:
        raise _err(source, where, f"missing field '{key}'")
    return doc[key]


def _number(value: Any, source: str, where: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= minimum:
        raise _err(source, where, f"expected a number >= {minimum:g}, got {value!r}")
    return value


def _block(doc: dict, source: str, i: int) -> BlockSpec:
    where = f"blocks[{i}]"
    name = _need(doc, "name", source, where)
    where = f"block {name!r}"
    tensors = []
    for j, item in enumerate(_need(doc, "tensors", source, where)):
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], list) or not all(isinstance(d, int) and d >= 0 for d in item[1])):
            raise _err(source, f"{where} tensors[{j}]", f"expected [name, [dims…]], got {item!r}")
        tensors.append((item[0], tuple(item[1])))
    kwargs: dict[str, Any] = {k: float(_number(doc.get(k, 0.0), source, f"{where} {k}")) for k in _BLOCK_NUMBERS}
    kwargs.update({k: int(_number(doc.get(k, 0), source, f"{where} {k}")) for k in _BLOCK_INTS})
    tokens = int(_number(_need(doc, "tokens", source, where), source, f"{where} tokens", 1))
    by_size = []
    listed = doc.get("activation_elements_by_size", [])
    if not isinstance(listed, list):
        raise _err(source, f"{where} activation_elements_by_size", f"expected a list of [size class, elements], "
                   f"got {listed!r}")
    for j, item in enumerate(listed):
        if (not isinstance(item, list) or len(item) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in item)):
            raise _err(source, f"{where} activation_elements_by_size[{j}]",
                       f"expected [size class, elements] (two positive whole numbers), got {item!r}")
        by_size.append((item[0], item[1]))
    if by_size and sum(n for _, n in by_size) != kwargs["activation_elements_per_call"]:
        raise _err(source, f"{where} activation_elements_by_size",
                   f"sums to {sum(n for _, n in by_size)}, not activation_elements_per_call = "
                   f"{kwargs['activation_elements_per_call']}")
    return BlockSpec(name=name, component=str(_need(doc, "component", source, where)), tensors=tuple(tensors),
                     tokens=tokens, activation_elements_by_size=tuple(by_size), **kwargs)


def _phase(doc: dict, source: str, i: int) -> PhaseSpec:
    name = _need(doc, "name", source, f"phases[{i}]")
    passes = tuple(
        PassSpec(blocks=tuple(_need(p, "blocks", source, f"phase {name!r} passes[{j}]")),
                 per_step=bool(p.get("per_step", False)), kv=p.get("kv", "none"), purpose=p.get("purpose", ""))
        for j, p in enumerate(_need(doc, "passes", source, f"phase {name!r}")))
    return PhaseSpec(name=name, per=_need(doc, "per", source, f"phase {name!r}"), passes=passes)


def workload_from_dict(doc: dict, source: str = "<catalog>") -> Workload:
    if not isinstance(doc, dict):
        raise _err(source, "top level", f"expected a JSON object, got {type(doc).__name__}")
    version = _need(doc, "schema_version", source, "top level")
    if version != CATALOG_SCHEMA_VERSION:
        raise _err(source, "schema_version", f"unknown version {version!r} (this residency reads "
                   f"{CATALOG_SCHEMA_VERSION})", hint="upgrade residency, or regenerate the catalog")
    blocks = tuple(_block(b, source, i) for i, b in enumerate(_need(doc, "blocks", source, "top level")))
    phases = tuple(_phase(p, source, i) for i, p in enumerate(_need(doc, "phases", source, "top level")))
    try:
        return Workload(
            name=str(_need(doc, "name", source, "top level")), blocks=blocks, phases=phases,
            steps=int(_number(_need(doc, "steps", source, "top level"), source, "steps", 1)),
            context_frames=int(_number(doc.get("context_frames", 0), source, "context_frames")),
            batch=int(_number(doc.get("batch", 1), source, "batch", 1)),
            kv_dtype=str(doc.get("kv_dtype", "bf16")),
            video_frames_per_latent=int(_number(doc.get("video_frames_per_latent", 1), source,
                                                "video_frames_per_latent", 1)),
            source=str(doc.get("source", source)), extra=dict(doc.get("extra", {})))
    except ResidencyError as e:
        raise _err(source, "schedule", e.message, e.hint) from None


def workload_to_dict(w: Workload) -> dict[str, Any]:
    blocks = []
    for b in w.blocks:
        entry: dict[str, Any] = {"name": b.name, "component": b.component,
                                 "tensors": [[n, list(s)] for n, s in b.tensors], "tokens": b.tokens}
        entry.update({k: getattr(b, k) for k in _BLOCK_NUMBERS + _BLOCK_INTS if getattr(b, k)})
        if b.activation_elements_by_size:
            entry["activation_elements_by_size"] = [list(pair) for pair in b.activation_elements_by_size]
        blocks.append(entry)
    return {
        "schema_version": CATALOG_SCHEMA_VERSION, "name": w.name, "source": w.source, "steps": w.steps,
        "context_frames": w.context_frames, "batch": w.batch, "kv_dtype": w.kv_dtype,
        "video_frames_per_latent": w.video_frames_per_latent, "blocks": blocks,
        "phases": [{"name": ph.name, "per": ph.per,
                    "passes": [{"blocks": list(p.blocks), "per_step": p.per_step, "kv": p.kv, "purpose": p.purpose}
                               for p in ph.passes]} for ph in w.phases],
        "extra": w.extra,
    }


def load_workload_file(path: str | os.PathLike[str]) -> Workload:
    doc = read_json(path, "the catalog entry", "regenerate it with tools/gen_catalog.py")
    return workload_from_dict(doc, str(path))
