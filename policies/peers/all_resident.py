"""Peer `all-resident`: the no-offload baseline of every runtime (a plain `model.to(device)`; ComfyUI's
full load when the model fits): every block resident at the compute dtype's format, nothing streamed.

Execution mode: eager under every request: the baseline is the model as written. (A resident model that compiles
or captures graphs is what `comfyui-partial` and ours plan when the request allows those modes.)

Sources:
- https://docs.pytorch.org/docs/stable/generated/torch.nn.Module.html (`Module.to`)
- https://github.com/Comfy-Org/ComfyUI/blob/master/comfy/model_management.py (`load_models_gpu`: the whole
  model is loaded when free memory allows)
"""

from __future__ import annotations

from policies.base import PlanRequest, build_plan, uniform_blocks, weights_format
from residency.plan import Execution, Plan

NAME = "all-resident"
# `model.to(device)` from the pageable state dict, one copy per tensor, before the first call: it only
# shapes the session start, never a steady frame.
EXECUTION = Execution(copy_mode="sync", prefetch_depth=0, pinned=False, per_tensor_copies=True)


def plan(req: PlanRequest) -> Plan:
    """Every block resident at the compute dtype's format; predicted by the simulator (build_plan)."""
    fmt = weights_format(req.compute_dtype)
    blocks = uniform_blocks(req.workload, "resident", fmt, req.compute_dtype)
    return build_plan(req, NAME, blocks, EXECUTION, notes=(f"every block resident at {fmt}",))
