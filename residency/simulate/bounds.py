"""The physical floor of a steady latent frame from the compute floor and the fewest link bytes.

No plan at the same precisions and budget can beat it; plans are measured against it.
"""

from __future__ import annotations

from residency.device.profile import DeviceProfile
from residency.plan.plan import Plan
from residency.simulate.costs import compute_s
from residency.simulate.memory import GPU_WORKSPACE_BYTES
from residency.workload.spec import Workload


def compute_floor_s(workload: Workload, plan: Plan, profile: DeviceProfile) -> float:
    """Every call as if its block were resident at the plan's compute dtype: no copy, no dequant."""
    total = 0.0
    for ph in workload.frame_phases():
        for p in ph.passes:
            kv_read = p.kv != "none"
            for name in p.blocks:
                total += workload.count(p) * compute_s(workload.by_name[name], plan.by_name[name], profile,
                                                       workload.context_frames, kv_read, plan.kv_dtype,
                                                       workload.batch)
    return total


def min_link_bytes(workload: Workload, plan: Plan, profile: DeviceProfile) -> float:
    """Fewest bytes per frame that must cross the link when the frame's weights (packed, at the plan's
    formats) exceed the memory left by KV, activations and workspace: the blocks called least are
    streamed first, fractionally."""
    frame_blocks = list(dict.fromkeys(b for ph in workload.frame_phases() for b in ph.blocks))
    fixed = workload.kv_cache_bytes(plan.kv_dtype) + max(
        (workload.by_name[b].activation_bytes(plan.by_name[b].compute_dtype, workload.batch) for b in frame_blocks),
        default=0)
    fixed += GPU_WORKSPACE_BYTES if profile.is_gpu else 0
    room = plan.budget.vram_bytes - fixed
    sizes = {b: workload.by_name[b].nbytes(plan.by_name[b].format) for b in frame_blocks}
    excess = sum(sizes.values()) - room
    if excess <= 0:
        return 0.0
    moved = 0.0
    for b in sorted(frame_blocks, key=workload.calls_per_frame):
        if excess <= 0:
            break
        part = min(sizes[b], excess)
        moved += part * workload.calls_per_frame(b)
        excess -= part
    return moved


def lower_bound_s(workload: Workload, plan: Plan, profile: DeviceProfile) -> float:
    """max(K + (1−o)·C, C + (1−o)·K) for the compute floor K and the fewest link seconds C: even a
    perfectly pipelined plan pays the device's measured copy/compute interference (overlap o)."""
    link_peak = max(profile.link["h2d_pinned"].y) * 1e9
    k = compute_floor_s(workload, plan, profile)
    c = min_link_bytes(workload, plan, profile) / link_peak
    shared = 1.0 - profile.copy_compute_overlap
    return max(k + shared * c, c + shared * k)
