"""Peer `comfyui-partial`: ComfyUI's classic partial load ("lowvram" model patching): largest modules
resident within a weight budget, the rest cast per use; with its TorchCompileModel node where the request
allows compiled or graphed blocks.

The weight budget is free memory − max(0.8 GiB + reserve, estimated inference memory); leaf modules are
taken largest first while they fit; the others keep their weights in host memory and copy and cast them
at every forward, on one of two round-robin offload streams.

Execution mode, as documented: the TorchCompileModel node (comfy_extras/nodes_torch_compile.py) wraps the
diffusion model in `torch.compile` with a backend of "inductor" or "cudagraphs". A leaf module kept on the
device runs its plain forward (comfy/ops.py: `forward` calls `forward_comfy_cast_weights` only when
`comfy_cast_weights` is set, i.e. the module was left out of the load); one cast per use calls
`cast_bias_weight`, which is decorated `@torch.compiler.disable()`: a graph break at every such leaf module. So
CUDA graphs (and compiled regions of any size) cover only blocks fully resident; a block cast per use runs as
eager pieces between breaks — taken as eager here. Per block, then:
- resident: "graphed" where the request simulates graphs on a GPU (the cudagraphs backend) or "compiled" (the
  inductor backend), whichever predicts the faster plan that fits (a user tries both and keeps the faster);
  where graphs are not allowed (`residency plan`'s "auto": the runtime captures none), the inductor backend:
  compiled; under an "eager" request, eager;
- streamed (cast per use): eager in every case.

Sources:
- https://github.com/Comfy-Org/ComfyUI/blob/master/comfy/model_management.py (`minimum_inference_memory`,
  `extra_reserved_memory`, `load_models_gpu`, `get_offload_stream`)
- https://github.com/Comfy-Org/ComfyUI/blob/master/comfy/model_patcher.py (partial load: modules sorted by
  size, the ones left out patched to cast their weights per use)
- https://github.com/Comfy-Org/ComfyUI/blob/master/comfy/ops.py (`cast_bias_weight`: weight and bias copied
  and cast at each forward, `@torch.compiler.disable()`; `forward`: the plain forward when not cast)
- https://github.com/Comfy-Org/ComfyUI/blob/master/comfy_extras/nodes_torch_compile.py (TorchCompileModel,
  backend "inductor" or "cudagraphs") and comfy_api/torch_helpers/torch_compile.py (`set_torch_compile_wrapper`)
"""

from __future__ import annotations

from policies.base import MODE_NOTE_PREFIX, PlanRequest, build_plan, fits_memory, weights_format
from policies.peers._common import allowed_modes, fill_greedy, inference_bytes, split_blocks, with_exec_modes
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
    # TorchCompileModel: only the resident blocks run compiled or graphed (cast per use is a graph break)
    backends = [m for m in ("compiled", "graphed") if m in allowed_modes(req)]
    if not backends or not resident:
        return build_plan(req, NAME, blocks, EXECUTION, notes=notes)
    plans = []
    for mode in backends:
        moded = with_exec_modes(blocks, {n: mode for n in resident})
        backend = "cudagraphs" if mode == "graphed" else "inductor"
        note = (f"{MODE_NOTE_PREFIX}TorchCompileModel backend {backend}: the {len(resident)} resident blocks "
                f"{mode}, the blocks cast per use eager (cast_bias_weight is a graph break)")
        plans.append(build_plan(req, NAME, moded, EXECUTION, notes=(*notes, note)))
    # the faster backend among those whose plan fits (graph pools can make a graphed plan miss the budget)
    fitting = [p for p in plans if fits_memory(p)] or plans
    return min(fitting, key=lambda p: p.prediction.frame_ms)
