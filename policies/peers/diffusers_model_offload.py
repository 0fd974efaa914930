"""Peer `diffusers-model-offload`: diffusers `enable_model_cpu_offload`: whole components swapped along
the pipeline's model sequence, each loaded when called.

Execution mode: eager under every request. The documentation below pairs no compile with model offloading, and
PyTorch's own report of `enable_model_cpu_offload` with a compiled transformer found it erroring or breaking the
graph (https://github.com/pytorch/pytorch/issues/150711); the peer reproduces the documented, eager path.

Sources:
- https://github.com/huggingface/diffusers/blob/main/src/diffusers/pipelines/pipeline_utils.py
  (`enable_model_cpu_offload`, `model_cpu_offload_seq`)
- https://github.com/huggingface/accelerate/blob/main/src/accelerate/big_modeling.py (`cpu_offload_with_hook`:
  a component is moved to the device by its own hook and offloaded by the next one's)
- https://huggingface.co/docs/diffusers/optimization/memory (model offloading)
"""

from __future__ import annotations

from dataclasses import replace

from policies.base import PlanRequest, build_plan, weights_format
from policies.peers._common import inference_bytes, workspace_bytes
from residency.plan import BlockPlan, Execution, Plan
from residency.units import fmt_bytes
from residency.workload import Workload

NAME = "diffusers-model-offload"
# The component's pre-forward hook offloads the previous component, then `module.to(device)`:
# - per_tensor_copies, pinned=False: `.to()` moves the pageable state dict one parameter at a time;
# - copy_mode "sync", depth 0: nothing is streamed per call; loads block the compute that needs them;
# - lookahead_from_compute_start: the simulator puts a load on the copy engine, so without this flag it
#   would run every load of every frame ahead of compute; with it a block's load waits until the
#   previous call started (the nearest the contract gets to "loads when called", see `plan`).
EXECUTION = Execution(copy_mode="sync", prefetch_depth=0, lookahead_from_compute_start=True, pinned=False,
                      per_tensor_copies=True)


def frame_components(w: Workload) -> list[str]:
    """Components that run in the per-latent-frame phases, in order."""
    names = dict.fromkeys(b for ph in w.frame_phases() for b in ph.blocks)
    return list(dict.fromkeys(w.by_name[b].component for b in names))


def component_bytes(w: Workload, fmt: str) -> dict[str, int]:
    """Component name -> bytes of its blocks' weights stored as `fmt`."""
    out: dict[str, int] = {}
    for b in w.blocks:
        out[b.component] = out.get(b.component, 0) + b.nbytes(fmt)
    return out


def plan(req: PlanRequest) -> Plan:
    """diffusers model offload's plan: whole components resident in turn, reloaded when called.

    Components that share the frame loop reload every frame (lifetime "phase"); a note corrects the
    predicted peak where a phase runs several components at once.
    """
    w = req.workload
    fmt = weights_format(req.compute_dtype)
    per_frame = frame_components(w)
    # Each component is offloaded when the next one in the sequence is called. If two or more components
    # run every latent frame (DiT then decoder), each evicts the other, so both reload every frame:
    # lifetime "phase" reloads a block at each run of each phase that uses it. A component alone in the
    # frame loop is never evicted after its first load: it stays for the session.
    sticky = set(per_frame) if len(per_frame) == 1 else set()
    blocks = [BlockPlan(b.name, "resident", fmt, req.compute_dtype,
                        lifetime="session" if b.component in sticky else "phase") for b in w.blocks]
    sizes = component_bytes(w, fmt)
    largest = max(sizes, key=sizes.get)
    notes = [f"components swapped whole at {fmt}; reloaded every latent frame: "
             + (", ".join(c for c in per_frame if c not in sticky) or "none")]
    # Approximations of the contract (lifetime is per phase, not per component call):
    # - a phase that runs several components (encode: encoder, then the DiT's anchor cache write) holds
    #   them together in the simulator, while diffusers holds only one at a time;
    # - a component used by consecutive phases (the DiT in encode, then denoise of frame 1) reloads at the
    #   phase change, which diffusers skips: session start only, never a steady frame.
    # Both only over-state; diffusers' own peak is the largest component beside the run's memory.
    own_peak = sizes[largest] + inference_bytes(req) + workspace_bytes(req)
    plan = build_plan(req, NAME, blocks, EXECUTION, notes=notes)
    shared = [ph.name for ph in w.phases if len({w.by_name[b].component for b in ph.blocks}) > 1]
    sim_peak = plan.prediction.peak_total_bytes
    if shared and sim_peak > own_peak * 1.01:
        note = (f"phases {', '.join(shared)} run several components, which the prediction holds together "
                f"({fmt_bytes(sim_peak)}); diffusers holds one at a time: the largest, {largest} "
                f"({fmt_bytes(sizes[largest])}), peak ≈ {fmt_bytes(own_peak)}")
        plan = replace(plan, notes=plan.notes + (note,))
    return plan
