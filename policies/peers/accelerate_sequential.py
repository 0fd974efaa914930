"""Peer `accelerate-sequential`: accelerate `cpu_offload`, which diffusers' `enable_sequential_cpu_offload`
applies to every component of a pipeline.

Everything is offloaded; each leaf module's pre-forward hook copies its weights in, blocking, every call.

Execution mode: eager under every request. Its hooks move tensors in and out of each leaf module in Python around
every forward; PyTorch's own report of diffusers' CPU offloading under torch.compile found it erroring or breaking
the graph (https://github.com/pytorch/pytorch/issues/150711), and the sources below name no compiled path.

Sources:
- https://github.com/huggingface/accelerate/blob/main/src/accelerate/big_modeling.py (`cpu_offload`)
- https://github.com/huggingface/accelerate/blob/main/src/accelerate/hooks.py (`AlignDevicesHook`: weights
  moved in by `pre_forward`, put back on the meta device by `post_forward`)
- https://github.com/huggingface/accelerate/blob/main/src/accelerate/utils/modeling.py
  (`set_module_tensor_to_device`, one tensor at a time)
- https://github.com/huggingface/diffusers/blob/main/src/diffusers/pipelines/pipeline_utils.py
  (`enable_sequential_cpu_offload`)
- https://huggingface.co/docs/diffusers/optimization/memory (CPU offloading)
"""

from __future__ import annotations

from policies.base import PlanRequest, build_plan, uniform_blocks, weights_format
from residency.plan import Execution, Plan

NAME = "accelerate-sequential"
# AlignDevicesHook: `set_module_tensor_to_device(..., non_blocking=False)` per tensor in each leaf module's
# pre_forward, then back to meta after forward, so every call re-copies every tensor:
# - per_tensor_copies: one transfer per tensor (leaf-module granularity) on the transfer-size curve;
# - copy_mode "sync", depth 0: the copy runs on the compute stream, nothing is prefetched;
# - pinned=False: the offloaded state dict is ordinary (pageable) host memory.
EXECUTION = Execution(copy_mode="sync", prefetch_depth=0, pinned=False, per_tensor_copies=True)


def plan(req: PlanRequest) -> Plan:
    """accelerate's plan: every block streamed at the compute format, tensor by tensor, blocking.

    Predicted by the simulator (build_plan); a plan that does not fit carries a note, not an error.
    """
    fmt = weights_format(req.compute_dtype)  # accelerate keeps weights as loaded: no quantization
    blocks = uniform_blocks(req.workload, "streamed", fmt, req.compute_dtype)
    return build_plan(req, NAME, blocks, EXECUTION,
                      notes=(f"every block streamed at {fmt}, tensor by tensor, blocking, from pageable memory",))
