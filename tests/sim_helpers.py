"""Hand-checkable device profiles and workloads for the cost-model tests.

Flat rates everywhere (one bandwidth at every size, one matmul rate at every row count).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from residency.device import load_profile, profile_from_dict, profile_to_dict
from residency.device.profile import COMPUTE_DTYPES, LINK_DIRECTIONS, Curve, DeviceProfile, Provenance
from residency.errors import ResidencyError
from residency.formats import FORMATS
from residency.plan import BlockPlan, Budget, Execution, Plan
from residency.workload import BlockSpec, PassSpec, PhaseSpec, Workload


def flat_profile(link_gbps=10.0, tflops=1.0, memory_gbps=1e6, overlap=1.0, launch_us=0.0, dequant_gw=1.0,
                 memory_bytes=2**34, name="flat", backend="cuda") -> DeviceProfile:
    flat = Curve((1.0, 2.0**40), (link_gbps, link_gbps))
    return DeviceProfile(
        name=name, vendor="test", backend=backend, torch_version="", cuda_version="", hip_version="", driver="",
        date="2026-11-23", memory_total_bytes=memory_bytes, memory_reserve_bytes=0, memory_usable_bytes=memory_bytes,
        link={d: flat for d in LINK_DIRECTIONS}, device_memory_gbps=memory_gbps,
        matmul_tflops={d: Curve((1.0, 1e6), (tflops, tflops)) for d in COMPUTE_DTYPES},
        dequant_gweights_per_s={f: dequant_gw for f in FORMATS}, copy_compute_overlap=overlap,
        launch_overhead_us=launch_us, provenance={"all": Provenance("datasheet", "test")})


def linear_block(name: str, dim: int, tokens: int, component: str = "dit") -> BlockSpec:
    """One dim×dim matrix: 2·dim² FLOPs per token, dim² weights."""
    return BlockSpec(name=name, component=component, tensors=(("w", (dim, dim)),), tokens=tokens,
                     flops_per_token=2.0 * dim * dim)


def chain_workload(n: int = 4, dim: int = 1024, tokens: int = 256, steps: int = 1) -> Workload:
    blocks = tuple(linear_block(f"dit.blocks.{i}", dim, tokens) for i in range(n))
    denoise = PhaseSpec("denoise", "latent_frame", (PassSpec(tuple(b.name for b in blocks), per_step=True),))
    return Workload(name="chain", blocks=blocks, phases=(denoise,), steps=steps, context_frames=0)


def make_plan(workload: Workload, profile: DeviceProfile, placements: dict[str, str] | None = None,
              fmt: str = "BF16", depth: int = 1, vram: int = 2**34, frame_ms=None, **execution) -> Plan:
    placements = placements or {}
    blocks = tuple(BlockPlan(b.name, placements.get(b.name, "resident"), fmt) for b in workload.blocks)
    return Plan(model=workload.name, workload_fingerprint=workload.fingerprint(), profile=profile.name,
                profile_fingerprint="test", policy="test", budget=Budget(vram, frame_ms), blocks=blocks,
                execution=Execution(prefetch_depth=depth, **execution), steps=workload.steps,
                context_frames=workload.context_frames)


def matrices_and_vectors_block(matrices: list[tuple[int, int]], vectors: list[int]) -> BlockSpec:
    """A DiT block of the given weight matrices and 1-D vectors (norms, biases): what a dequant converts."""
    tensors = tuple((f"m{i}", s) for i, s in enumerate(matrices)) + tuple((f"v{i}", (n,)) for i, n in enumerate(vectors))
    return BlockSpec(name="dit.blocks.0", component="dit", tensors=tensors, tokens=16, flops_per_token=1.0)


def shipped_doc_with(key: str, value: Any) -> dict:
    """A shipped profile's JSON document with one measured field added (and its provenance)."""
    doc = copy.deepcopy(profile_to_dict(load_profile("rx-7800-xt")))
    doc[key] = value
    doc["provenance"][key] = {"kind": "measured", "source": "test", "derating": ""}
    return doc


def assert_profile_refused(doc: dict, field: str, words: str) -> None:
    """Reading `doc` as bad.json fails with an error naming the file, `field` and `words`."""
    with pytest.raises(ResidencyError) as e:
        profile_from_dict(doc, "bad.json")
    assert f"'{field}'" in e.value.message and words in e.value.message and "bad.json" in e.value.message
