"""Catalog documents (JSON) <-> Workload, with validation that names the file and the field.

A catalog entry is the inventory of a real architecture plus its call schedule, committed as data.
"""

from __future__ import annotations

import math
import os
from typing import Any

from residency.errors import ResidencyError
from residency.formats.dtypes import COMPUTE_DTYPE_BYTES
from residency.jsonfile import read_json
from residency.validate import MAX_NAME_CHARS, Reader, at, show
from residency.workload.spec import (
    KV_ACCESS,
    KV_DTYPE_BYTES,
    MAX_CONTEXT_FRAMES,
    MAX_STEPS,
    PERS,
    BlockSpec,
    PassSpec,
    PhaseSpec,
    Workload,
)

CATALOG_SCHEMA_VERSION = 1
_BLOCK_NUMBERS = ("fixed_flops", "flops_per_token", "self_attn_flops_per_token_pair",
                  "context_attn_flops_per_token_pair", "activation_bytes_per_token")
_BLOCK_INTS = ("context_tokens_per_frame", "kv_channels_per_token", "ops_per_call", "kernels_per_call",
               "activation_elements_per_call")


_HINT = "regenerate the catalog with python -m pipelines.catalog_build"  # a shipped entry's
# a document of the user's (their own workload, saved from Python): how such a document is made
USER_HINT = ("write it with residency.workload.workload_to_dict(workload_from_module(model, example, name=…)), "
             "or plan the model's directory instead")
# Bounds on a catalog document. The simulator walks every block of every pass once per step and frame,
# so these cap the work a hostile catalog can ask for; the largest real entry (flux) has under 100 blocks.
MAX_BLOCKS = 10_000
MAX_TENSORS_PER_BLOCK = 4_096
MAX_DIM = 2**40  # elements along one tensor dimension
# Elements of one tensor, and of the whole model: the largest real tensor (an embedding of 256 K tokens × 16 K) is
# 2^32, the largest model ~2^41. Unbounded, a [2^40, 2^40] tensor planned as "2199023255552.0 TiB" and a hint of a
# --vram that --vram itself refuses (its cap, 2^60 bytes, is above 2^52 elements at 4 bytes).
MAX_TENSOR_ELEMENTS = 2**48
MAX_MODEL_ELEMENTS = 2**52
MAX_TOKENS = 2**32
MAX_PHASES, MAX_PASSES_PER_PHASE = 64, 256
MAX_BATCH = 1_024
MAX_VIDEO_FRAMES_PER_LATENT = 1_024
MAX_COUNT = 2**53  # element and channel counts: exact as JSON numbers
# Bounds of a block's cost figures, each far above any real model's and far below what turns a prediction into
# nonsense (1e30 FLOPs a token was read and predicted 9e21 ms a frame): a figure past one is a typo or a unit mix-up.
MAX_BLOCK_NUMBERS = {
    "flops_per_token": 1e15,  # 2 FLOPs a weight: a block of 500 G weights, a token at a time
    "fixed_flops": 1e18,  # a call's, whatever its tokens
    "self_attn_flops_per_token_pair": 1e9,  # Σ 4·width: 4 × 65536 wide × 4096 attention layers
    "context_attn_flops_per_token_pair": 1e9,
    "activation_bytes_per_token": 2.0**40,
}
MAX_EXTRA_DEPTH = 8  # the free-form facts: the deepest shipped entry nests 3
_TOP_KNOWN = ("schema_version", "name", "source", "steps", "context_frames", "batch", "kv_dtype",
              "video_frames_per_latent", "blocks", "phases", "extra")
_BLOCK_KNOWN = ("name", "component", "tensors", "tokens", *_BLOCK_NUMBERS, *_BLOCK_INTS, "activation_elements_by_size",
                "modules", "own_dtypes", "read_outside_calls")


def _block(r: Reader, doc: Any, path: str) -> BlockSpec:
    doc = r.obj(doc, path, _BLOCK_KNOWN, required=("name", "component", "tensors", "tokens"))
    name = r.string(doc["name"], f"{path}.name", non_empty=True)  # a group's label joins its members' names
    r = r.within(f"block {show(name)}")
    tensors, seen = [], set()
    for j, item in enumerate(r.items(doc["tensors"], f"{path}.tensors", max_items=MAX_TENSORS_PER_BLOCK)):
        where = f"{path}.tensors[{j}]"
        if not isinstance(item, list) or len(item) != 2:
            raise r.bad(where, item, "[name, [dims…]]")
        shape = r.items(item[1], f"{where}[1]", max_items=8)
        dims = tuple(r.integer(d, f"{where}[1][{k}]", 0, MAX_DIM, unit="elements") for k, d in enumerate(shape))
        if math.prod(dims) > MAX_TENSOR_ELEMENTS:
            raise r.fail(f"{where}[1]", f"= {list(dims)}: {math.prod(dims):.3g} elements, more than the "
                         f"{MAX_TENSOR_ELEMENTS:.3g} (2^48) of any tensor residency plans")
        tensor = r.string(item[0], f"{where}[0]", non_empty=True)
        if tensor in seen:  # its bytes were counted twice
            raise r.fail(f"{where}[0]", f"= {show(tensor)}: the block lists this tensor twice")
        seen.add(tensor)
        tensors.append((tensor, dims))
    kwargs: dict[str, Any] = {k: r.number(r.optional(doc, k, 0.0), at(path, k), 0.0, maximum=MAX_BLOCK_NUMBERS[k])
                              for k in _BLOCK_NUMBERS}
    kwargs.update({k: r.integer(r.optional(doc, k, 0), at(path, k), 0, MAX_COUNT) for k in _BLOCK_INTS})
    by_size = []
    listed = r.items(r.optional(doc, "activation_elements_by_size", []), f"{path}.activation_elements_by_size",
                     max_items=64)
    for j, item in enumerate(listed):
        where = f"{path}.activation_elements_by_size[{j}]"
        if (not isinstance(item, list) or len(item) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_COUNT for v in item)):
            raise r.bad(where, item, "[size class, elements] (two positive whole numbers)")
        by_size.append((item[0], item[1]))
    if by_size and sum(n for _, n in by_size) != kwargs["activation_elements_per_call"]:
        raise r.fail(f"{path}.activation_elements_by_size",
                     f"sums to {sum(n for _, n in by_size)}, not activation_elements_per_call = "
                     f"{kwargs['activation_elements_per_call']}")
    # {tensor: its own dtype} of the tensors kept in another dtype than the model's main one
    own = r.obj(r.optional(doc, "own_dtypes", {}), f"{path}.own_dtypes", known=[t for t, _ in tensors])
    return BlockSpec(name=name,
                     own_dtypes=tuple((t, r.choice(d, at(f"{path}.own_dtypes", t), COMPUTE_DTYPE_BYTES))
                                      for t, d in own.items()),
                     component=r.string(doc["component"], f"{path}.component", non_empty=True),
                     tensors=tuple(tensors), tokens=r.integer(doc["tokens"], f"{path}.tokens", 1, MAX_TOKENS),
                     activation_elements_by_size=tuple(by_size),
                     modules=tuple(r.string(m, f"{path}.modules[{j}]") for j, m in enumerate(
                         r.items(r.optional(doc, "modules", []), f"{path}.modules", max_items=MAX_TENSORS_PER_BLOCK))),
                     read_outside_calls=r.boolean(r.optional(doc, "read_outside_calls", False),
                                                  f"{path}.read_outside_calls"),
                     **kwargs)


def _phase(r: Reader, doc: Any, path: str, known_blocks: frozenset[str]) -> PhaseSpec:
    doc = r.obj(doc, path, ("name", "per", "passes"), required=("name", "per", "passes"))
    passes = []
    for j, p in enumerate(r.items(doc["passes"], f"{path}.passes", max_items=MAX_PASSES_PER_PHASE)):
        where = f"{path}.passes[{j}]"
        p = r.obj(p, where, ("blocks", "per_step", "kv", "purpose"), required=("blocks",))
        names = r.items(p["blocks"], f"{where}.blocks")
        for k, name in enumerate(names):
            if r.string(name, f"{where}.blocks[{k}]") not in known_blocks:
                raise r.fail(f"{where}.blocks[{k}]", f"= {show(name)}: unknown blocks cannot be scheduled (the "
                             "name is not in 'blocks')")
        if len(set(names)) != len(names):
            raise r.fail(f"{where}.blocks", "names a block twice: a pass runs each of its blocks once")
        passes.append(PassSpec(blocks=tuple(names), per_step=r.boolean(r.optional(p, "per_step", False),
                                                                      f"{where}.per_step"),
                               kv=r.choice(r.optional(p, "kv", "none"), f"{where}.kv", KV_ACCESS),
                               purpose=r.string(r.optional(p, "purpose", ""), f"{where}.purpose")))
    return PhaseSpec(name=r.string(doc["name"], f"{path}.name", non_empty=True, max_chars=MAX_NAME_CHARS),
                     per=r.choice(doc["per"], f"{path}.per", PERS), passes=tuple(passes))


def workload_from_dict(doc: Any, source: str = "<catalog>", hint: str = _HINT) -> Workload:
    """A Workload from a parsed catalog document; every field checked, errors naming file and field and giving
    `hint` (default: regenerate the shipped catalog; USER_HINT for a document of the user's)."""
    r = Reader(source, hint, expects="a workload (catalog document)")
    r.obj(doc, "", _TOP_KNOWN)
    version = r.need(doc, "schema_version")
    if isinstance(version, bool) or version != CATALOG_SCHEMA_VERSION:
        raise r.fail("schema_version", f"= {show(version)}: unknown version {show(version)} (this residency reads "
                     f"{CATALOG_SCHEMA_VERSION})", hint="upgrade residency, or regenerate the catalog")
    listed = r.items(r.need(doc, "blocks"), "blocks", min_items=1, max_items=MAX_BLOCKS)
    blocks = tuple(_block(r, b, f"blocks[{i}]") for i, b in enumerate(listed))
    names = [b.name for b in blocks]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise r.fail(f"blocks[{names.index(twice, names.index(twice) + 1)}].name",
                     f"= {show(twice)}: block names must be unique")
    total = sum(math.prod(shape) for b in blocks for _, shape in b.tensors)
    if total > MAX_MODEL_ELEMENTS:
        raise r.fail("blocks", f"hold {total:.3g} weights in all, more than the {MAX_MODEL_ELEMENTS:.3g} (2^52) of any "
                     "model residency plans")
    known = frozenset(names)
    phases = tuple(_phase(r, p, f"phases[{i}]", known)
                   for i, p in enumerate(r.items(r.need(doc, "phases"), "phases", max_items=MAX_PHASES)))
    if not any(ph.passes for ph in phases if ph.per == "latent_frame"):  # PlanRequest's check, named by file here
        raise r.fail("phases", "holds no phase that runs per latent frame (per \"latent_frame\", with a pass): a plan holds a "
                     "frame, and this workload has none to plan",
                     hint="add a phase with \"per\": \"latent_frame\" and the passes one frame runs")
    run = {b for ph in phases for ps in ph.passes for b in ps.blocks}
    idle = next((i for i, n in enumerate(names) if n not in run), None)
    if idle is not None:  # planned, it was counted in the plan's table and not in its totals
        raise r.fail(f"blocks[{idle}].name", f"= {show(names[idle])}: no pass of any phase runs this block",
                     hint="name it in a pass of the phase that runs it, or remove the block")
    phase_names = [ph.name for ph in phases]
    for i, n in enumerate(phase_names):
        if n in phase_names[:i]:
            raise r.fail(f"phases[{i}].name", f"= {show(n)}: a phase of that name comes before it; phase names "
                         "must be unique")
    try:
        return Workload(
            name=r.string(r.need(doc, "name"), "name", non_empty=True, max_chars=MAX_NAME_CHARS), blocks=blocks,
            phases=phases,
            steps=r.integer(r.need(doc, "steps"), "steps", 1, MAX_STEPS, unit="denoise steps"),
            context_frames=r.integer(r.optional(doc, "context_frames", 0), "context_frames", 0,
                                     MAX_CONTEXT_FRAMES, unit="latent frames"),
            batch=r.integer(r.optional(doc, "batch", 1), "batch", 1, MAX_BATCH),
            kv_dtype=r.choice(r.optional(doc, "kv_dtype", "bf16"), "kv_dtype", KV_DTYPE_BYTES),
            video_frames_per_latent=r.integer(r.optional(doc, "video_frames_per_latent", 1),
                                              "video_frames_per_latent", 1, MAX_VIDEO_FRAMES_PER_LATENT),
            source=r.string(r.optional(doc, "source", source), "source"),
            extra=dict(r.shallow(r.obj(r.optional(doc, "extra", {}), "extra"), "extra", MAX_EXTRA_DEPTH)))
    except ResidencyError as e:
        if e.message.startswith(f"{source}: "):
            raise
        raise ResidencyError(f"{source}: {e.message}", hint=e.hint or hint) from None


def workload_to_dict(w: Workload) -> dict[str, Any]:
    """The workload as a catalog JSON document (schema CATALOG_SCHEMA_VERSION); zero fields left out."""
    blocks = []
    for b in w.blocks:
        entry: dict[str, Any] = {"name": b.name, "component": b.component,
                                 "tensors": [[n, list(s)] for n, s in b.tensors], "tokens": b.tokens}
        entry.update({k: getattr(b, k) for k in _BLOCK_NUMBERS + _BLOCK_INTS if getattr(b, k)})
        if b.activation_elements_by_size:
            entry["activation_elements_by_size"] = [list(pair) for pair in b.activation_elements_by_size]
        if b.modules:
            entry["modules"] = list(b.modules)
        if b.own_dtypes:
            entry["own_dtypes"] = dict(b.own_dtypes)
        if b.read_outside_calls:
            entry["read_outside_calls"] = True
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


def load_workload_file(path: str | os.PathLike[str], hint: str = _HINT) -> Workload:
    """The workload in the catalog JSON at `path`; `hint` as workload_from_dict's.

    Raises ResidencyError when the file is missing, is not JSON, or fails validation.
    """
    doc = read_json(path, "the catalog entry", "regenerate it with python -m pipelines.catalog_build"
                    if hint == _HINT else hint)
    return workload_from_dict(doc, str(path), hint)
