"""Peer `forge`: Forge's "GPU weights" budget: max(available/1.3, available − 1.25 GiB) for weights,
smallest modules resident first, the rest moved and cast on a mover stream.

Execution mode: eager under every request: the sources below run every module as written, the swapped ones
through `weights_manual_cast` on each call; no compiled or graph-captured path of theirs is reproduced.

Sources:
- https://github.com/lllyasviel/stable-diffusion-webui-forge/blob/main/backend/memory_management.py
  (`compute_model_gpu_memory_when_using_cpu_swap`: the budget; `build_module_profile`: modules taken
  smallest first; `load_models_gpu`)
- https://github.com/lllyasviel/stable-diffusion-webui-forge/blob/main/backend/stream.py (`mover_stream`)
- https://github.com/lllyasviel/stable-diffusion-webui-forge/blob/main/backend/operations.py
  (`weights_manual_cast`: weight and bias moved and cast on the mover stream, then an event;
  `main_stream_worker`: compute waits on it and the tensors are held until compute's event completes)
"""

from __future__ import annotations

from policies.base import PlanRequest, build_plan, weights_format
from policies.peers._common import fill_greedy, inference_bytes, split_blocks
from residency.plan import Execution, Plan
from residency.units import fmt_bytes

NAME = "forge"
INFERENCE_MARGIN_BYTES = int(1.25 * 2**30)
INFERENCE_RATIO = 1.3
# Swapped modules: `.to(device, non_blocking=True)` of each weight and bias on the `mover_stream`
# (one transfer per tensor) with the cast/dequant there too (dequant_on="copy"), an event the compute
# stream waits on, the tensors held until the compute event completes (two in flight: depth 1). The copy
# is issued from the module's own forward, so it runs ahead only as far as the CPU does
# (lookahead_from_compute_start). Swapped weights live in shared (pinned) memory.
EXECUTION = Execution(copy_mode="async", prefetch_depth=1, lookahead_from_compute_start=True, pinned=True,
                      per_tensor_copies=True)


def gpu_weights_budget(req: PlanRequest) -> int:
    """max(available/1.3, available − 1.25 GiB), available = the VRAM budget less KV and activations."""
    available = req.budget.vram_bytes - inference_bytes(req)
    return max(0, int(max(available / INFERENCE_RATIO, available - INFERENCE_MARGIN_BYTES)))


def plan(req: PlanRequest) -> Plan:
    """Forge's plan: smallest blocks resident within its GPU-weights budget, the rest streamed.

    Streamed blocks are cast on the copy side (dequant_on "copy"), as Forge's mover stream does.
    """
    w = req.workload
    fmt = weights_format(req.compute_dtype)
    budget = gpu_weights_budget(req)
    # Smallest first (ties: run order) until the next one would reach the budget.
    order = sorted((b.name for b in w.blocks), key=lambda n: w.by_name[n].nbytes(fmt))
    resident = fill_greedy(w, fmt, order, budget, stop_at_first_miss=True)
    blocks = split_blocks(w, resident, fmt, req.compute_dtype, dequant_on="copy")
    used = sum(w.by_name[n].nbytes(fmt) for n in resident)
    notes = (f"GPU weights {fmt_bytes(budget)}: {len(resident)} of {len(w.blocks)} blocks resident "
             f"({fmt_bytes(used)}), smallest first; the rest on the mover stream at {fmt}",)
    return build_plan(req, NAME, blocks, EXECUTION, notes=notes)
