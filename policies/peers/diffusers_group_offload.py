"""Peer `diffusers-group-offload`: diffusers `apply_group_offloading(use_stream=True)`, block level,
`num_blocks_per_group=1`, with the transformer under `torch.compile` where the request allows compiled blocks.

Every block is streamed: one copy stream loads the next group while the current one computes (depth 1),
the host synchronises that stream before each onload, and every tensor gets a pinned host copy beside the
module's own weights (≈ 2× the model in host RAM).

Execution mode, as documented: compiled wherever the request allows it (`_common.allowed_modes`), else eager.
- PR 11605 ("Make group offloading compatible with torch.compile()") makes the two work together and measures it:
  Wan 14B on an H100, offloading 4918 ms eager → 4110 ms compiled (no offloading: 4602 → 3766 ms); RTX 4090,
  offloading 13658 → 11584 ms. So a compiled block is what diffusers runs under offloading.
- group_offloading.py: `ModuleGroup.onload_` and `offload_` are decorated `@torch.compiler.disable()`, so the
  compiled transformer breaks at every group: one compiled graph per group (the simulator's compiled block), the
  hook run eagerly between them. `_onload_from_memory` calls `self.stream.synchronize()` ("Wait for previous
  Host->Device transfer to complete") before it issues the next group's copies, and `_offload_to_memory` calls
  `current_stream().synchronize()` when `record_stream` is False (the default): the host waits at every group.
  That per-group host work is `Execution.host_sync_per_onload_us` (the simulator charges it on the compute stream
  of every streamed call); it runs outside the compiled graph, so it stays at the eager launch cost whatever
  the mode — the break is why compiling does not shorten it.
- Never graphed, even where the request simulates graphs: a captured graph cannot contain the hook that runs
  between two groups, and "operations that synchronize the CPU with the GPU are prohibited during stream capture"
  (https://docs.nvidia.com/dl-cuda-graph/cuda-graph-basics/constraints.html: cudaStreamSynchronize among them).
  Where graphs are allowed it stays compiled.

Sources:
- https://github.com/huggingface/diffusers/blob/main/src/diffusers/hooks/group_offloading.py
- https://github.com/huggingface/diffusers/pull/10503 (module group offloading) and
  https://github.com/huggingface/diffusers/pull/10516 (prefetching on a CUDA stream)
- https://github.com/huggingface/diffusers/pull/11375 (with a stream, one block per group)
- https://github.com/huggingface/diffusers/pull/11106 (`low_cpu_mem_usage`; host RAM, VRAM and time of
  block- and leaf-level offloading on Flux)
- https://github.com/huggingface/diffusers/pull/11605 (group offloading under torch.compile; Wan 14B timings)
  and https://github.com/huggingface/diffusers/pull/11670 (its test, `test_compile_with_group_offloading`)
- https://huggingface.co/docs/diffusers/optimization/memory (group offloading)
"""

from __future__ import annotations

from policies.base import MODE_NOTE_PREFIX, PlanRequest, build_plan, uniform_blocks, weights_format
from policies.peers._common import fallback_mode, with_exec_modes
from residency.plan import Execution, Plan
from residency.units import fmt_bytes

NAME = "diffusers-group-offload"
# A host `stream.synchronize()` before each onload: the host waits for the copy stream and then pays the
# launch of the next group's copies. Stated estimate: ten kernel launches' worth of host time per onload, at the
# eager launch cost in every mode (the hook is `torch.compiler.disable`d: it never runs compiled).
HOST_SYNC_LAUNCHES = 10
# the mode its documentation gives the blocks (PR 11605): compiled; eager where the request allows no compile
DOCUMENTED_MODE = "compiled"
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
    mode = fallback_mode(req, DOCUMENTED_MODE)
    blocks = uniform_blocks(req.workload, "streamed", fmt, req.compute_dtype)
    blocks = with_exec_modes(blocks, {bp.name: mode for bp in blocks})
    ex = execution(req)
    need = host_bytes(req)
    notes = [f"every block streamed at {fmt}, one group per block, depth 1; host sync "
             f"{ex.host_sync_per_onload_us:.0f} µs per onload (= {HOST_SYNC_LAUNCHES} × launch overhead)",
             f"host RAM: {fmt_bytes(need)} (pinned copy of every tensor beside the weights, ≈ 2× model)"]
    if mode == "compiled":
        notes.append(f"{MODE_NOTE_PREFIX}every block compiled, a graph break at every group (its hooks are "
                     "torch.compiler.disable'd), the host sync outside the graph at eager cost")
    if req.host_bytes_available is not None and need > req.host_bytes_available:
        notes.append(f"does not fit: needs {fmt_bytes(need)} of host RAM, "
                     f"{fmt_bytes(req.host_bytes_available)} available")
    return build_plan(req, NAME, blocks, ex, notes=notes)
