"""Peer `comfyui-partial`: ComfyUI's classic partial load ("lowvram" model patching): largest modules
resident within a weight budget, the rest cast per use.

The weight budget is free memory − max(0.8 GiB + reserve, estimated inference memory); leaf modules are
taken largest first while they fit; the others keep their weights in host memory and copy and cast them
at every forward, on one of two round-robin offload streams.

Sources:
- https://github.com/Comfy-Org/ComfyUI/blob/master/comfy/model_management.py (`minimum_inference_memory`,
  `extra_reserved_memory`, `load_models_gpu`, `get_offload_stream`)
- https://github.com/Comfy-Org/ComfyUI/blob/master/comfy/model_patcher.py (partial load: modules sorted by
  size, the ones left out patched to cast their weights per use)
- https://github.com/Comfy-Org/ComfyUI/blob/master/comfy/ops.py (`cast_bias_weight`: weight and bias copied
  and cast at each forward)
"""

from __future__ import annotations

from policies.base import PlanRequest, build_plan, weights_format
from policies.peers._common import fill_greedy, inference_bytes, split_blocks
from residency.plan import Execution, Plan
from residency.units import fmt_bytes

NAME = "comfyui-partial"
# `minimum_inference_memory()`: 0.8 GiB (ComfyUI writes it as 1024·1024·1024·0.8) plus the reserve.
MIN_INFERENCE_BYTES = int(0.8 * 2**30)
# Weights cast per use: each leaf module's forward copies its weight and bias (one transfer per tensor)
# on one of two round-robin offload streams, each with a cast buffer sized to the largest weight
# (prefetch depth 1 → two slots); compute waits on the stream. The CPU issuing the next module's cast
# while this one computes is the only lookahead (lookahead_from_compute_start). Host weights are pageable.
EXECUTION = Execution(copy_mode="async", prefetch_depth=1, lookahead_from_compute_start=True, pinned=False,
                      per_tensor_copies=True)


def weight_budget(req: PlanRequest) -> int:
    """free − max(0.8 GiB + reserve, estimated inference memory), with the plan's VRAM budget as "free",
    the profile's reserve as ComfyUI's reserved memory, and KV + largest activation as the estimate."""
    reserve = req.profile.memory_reserve_bytes
    return max(0, req.budget.vram_bytes - max(MIN_INFERENCE_BYTES + reserve, inference_bytes(req)))


def plan(req: PlanRequest) -> Plan:
    """ComfyUI's partial load: largest blocks resident within its weight budget, the rest streamed.

    Predicted by the simulator (build_plan); the notes give the budget and the bytes kept resident.
    """
    w = req.workload
    fmt = weights_format(req.compute_dtype)
    budget = weight_budget(req)
    # ComfyUI sorts leaf modules largest first and skips any that would reach the budget, trying the
    # smaller ones after it. Our unit of residency is the block, so blocks are sorted (ties: run order).
    order = sorted((b.name for b in w.blocks), key=lambda n: -w.by_name[n].nbytes(fmt))
    resident = fill_greedy(w, fmt, order, budget, stop_at_first_miss=False)
    blocks = split_blocks(w, resident, fmt, req.compute_dtype)
    used = sum(w.by_name[n].nbytes(fmt) for n in resident)
    notes = (f"weight budget {fmt_bytes(budget)}: {len(resident)} of {len(w.blocks)} blocks resident "
             f"({fmt_bytes(used)}), largest first; the rest cast per use at {fmt}",)
    return build_plan(req, NAME, blocks, EXECUTION, notes=notes)
