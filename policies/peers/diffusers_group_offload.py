"""Peer `diffusers-group-offload`: diffusers `apply_group_offloading(use_stream=True)`, block level,
`num_blocks_per_group=1`.

Every block is streamed: one copy stream loads the next group while the current one computes (depth 1),
the host synchronises that stream before each onload, and every tensor gets a pinned host copy beside the
module's own weights (≈ 2× the model in host RAM).

Sources:
- https://github.com/huggingface/diffusers/blob/main/src/diffusers/hooks/group_offloading.py
- https://github.com/huggingface/diffusers/pull/10503 (module group offloading) and
  https://github.com/huggingface/diffusers/pull/10516 (prefetching on a CUDA stream)
- https://github.com/huggingface/diffusers/pull/11375 (with a stream, one block per group)
- https://github.com/huggingface/diffusers/pull/11106 (`low_cpu_mem_usage`; host RAM, VRAM and time of
  block- and leaf-level offloading on Flux)
- https://github.com/huggingface/diffusers/pull/11605 (group offloading under torch.compile; Wan 14B timings)
- https://huggingface.co/docs/diffusers/optimization/memory (group offloading)
"""

from __future__ import annotations

from policies.base import PlanRequest, build_plan, uniform_blocks, weights_format
from residency.plan import Execution, Plan
from residency.units import fmt_bytes

NAME = "diffusers-group-offload"
# A host `stream.synchronize()` before each onload: the host waits for the copy stream and then pays the
# launch of the next group's copies. Stated estimate: ten kernel launches' worth of host time per onload.
HOST_SYNC_LAUNCHES = 10
# Host RAM: a pinned copy of every tensor is made beside the module's own (pageable) weights.
HOST_COPIES = 2


def execution(req: PlanRequest) -> Execution:
    # - one copy stream, prefetch depth 1 (slots = 2): group N's pre-forward starts group N+1's copy, so a
    #   copy may only start once the previous block began computing (lookahead_from_compute_start);
    # - per_tensor_copies: the onload moves each parameter and buffer with its own `.to(non_blocking=True)`;
    # - pinned: every tensor has a pinned host copy.
    """diffusers group offload's execution: async copies, depth 1, per-tensor copies from pinned memory.

    The host sync per onload is HOST_SYNC_LAUNCHES x the profile's launch overhead (us).
    """
    return Execution(copy_mode="async", prefetch_depth=1, lookahead_from_compute_start=True, pinned=True,
                     per_tensor_copies=True,
                     host_sync_per_onload_us=HOST_SYNC_LAUNCHES * req.profile.launch_overhead_us)


def host_bytes(req: PlanRequest) -> int:
    """Host RAM the technique holds: the pinned copies beside the original weights (≈ 2× the model)."""
    return HOST_COPIES * req.workload.nbytes(weights_format(req.compute_dtype))


def plan(req: PlanRequest) -> Plan:
    """diffusers group offload's plan: every block streamed at the compute format, one group per block.

    A note says when its pinned copy of every tensor (about 2x the model) passes the host RAM available.
    """
    fmt = weights_format(req.compute_dtype)
    blocks = uniform_blocks(req.workload, "streamed", fmt, req.compute_dtype)
    ex = execution(req)
    need = host_bytes(req)
    notes = [f"every block streamed at {fmt}, one group per block, depth 1; host sync "
             f"{ex.host_sync_per_onload_us:.0f} µs per onload (= {HOST_SYNC_LAUNCHES} × launch overhead)",
             f"host RAM: {fmt_bytes(need)} (pinned copy of every tensor beside the weights, ≈ 2× model)"]
    if req.host_bytes_available is not None and need > req.host_bytes_available:
        notes.append(f"does not fit: needs {fmt_bytes(need)} of host RAM, "
                     f"{fmt_bytes(req.host_bytes_available)} available")
    return build_plan(req, NAME, blocks, ex, notes=notes)
