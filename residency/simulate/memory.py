"""Peak device memory of a plan, by kind: resident weights, slots, dequant scratch, KV, activations.

Phase-lifetime blocks count only while their phase runs, so the peak is the worst phase.
"""

from __future__ import annotations

import math

from residency.device.profile import DeviceProfile
from residency.formats import get_format
from residency.formats.dtypes import DTYPE_FORMAT, TORCH_DTYPES
from residency.formats.staging import staging_bytes
from residency.plan.plan import Plan
from residency.simulate.costs import resident_bytes, scratch_bytes
from residency.workload.spec import Workload

KINDS = ("resident", "resident_quantized", "slots", "dequant_scratch", "kv_cache", "activations", "workspace",
         "reserve")
# What the runtime's ledger accounts (and a trace's memory section names): these kinds minus "reserve", which lies
# outside the budget, plus "graph_pool" (the graphed blocks' private pools), which the simulator counts only for a
# plan with graphed blocks.
LEDGER_KINDS = (*(k for k in KINDS if k != "reserve"), "graph_pool")
# Matmul libraries' workspace (cuBLAS/hipBLASLt) and allocator slack on a GPU; none on the CPU backend.
GPU_WORKSPACE_BYTES = 128 * 2**20


def needs_staging(bp) -> bool:
    """Unpacked on the device at load: resident from another format, or streamed, dequant on copy."""
    unpacked = bp.placement == "resident" or (bp.placement == "streamed" and bp.dequant_on == "copy")
    return unpacked and bp.format != DTYPE_FORMAT[bp.compute_dtype]


def staged_weights(block, bp) -> int:
    """Weights of the block's largest tensor whose unpack goes through a staging chunk (0: none)."""
    return max((math.prod(shape) for shape, eff in block.converted(get_format(bp.format).name, bp.compute_dtype)
                if eff.uses_staging), default=0)


def thread_staging_bytes(workload: Workload, blocks, device_type: str) -> int:
    """The staging buffer of one dequantizing thread that unpacks `blocks` (see formats.staging)."""
    return max((staging_bytes(device_type, staged_weights(workload.by_name[b.name], b), TORCH_DTYPES[b.compute_dtype])
                for b in blocks), default=0)


def dequant_threads(plan: Plan) -> tuple[list, list]:
    """Blocks each dequantizing thread unpacks, each thread with its own staging: the compute side
    (per-call dequant) and the copy engine (unpacked at load)."""
    per_call = [b for b in plan.blocks if b.placement == "resident-quantized"
                or (b.placement == "streamed" and b.dequant_on == "compute")]
    return per_call, [b for b in plan.blocks if needs_staging(b)]


def slot_bytes(workload: Workload, plan: Plan) -> int:
    """One slot fits the largest streamed block as it lands: packed, or dequantized by the copy engine."""
    sizes = [workload.by_name[b.name].nbytes(DTYPE_FORMAT[b.compute_dtype] if b.dequant_on == "copy" else b.format)
             for b in plan.streamed()]
    return max(sizes, default=0)


def graph_pool_bytes(workload: Workload, plan: Plan, profile: DeviceProfile) -> int:
    """Device bytes the graphed blocks' private pools hold (0 when none is graphed or on the CPU).

    A captured graph keeps the intermediates it allocated in a pool of its own, which eager work cannot reuse:
    per graphed block class (blocks sharing a workload class share one pool, as torch.cuda.graph's `pool=`
    lets them) its largest block's activations plus the profile's graph_pool_bytes_per_class. A compiled block
    allocates nothing beyond eager (inductor's default mode keeps no pool; on the CPU nothing at all).
    """
    if not profile.is_gpu:
        return 0
    per_class: dict[str, int] = {}
    for bp in plan.blocks:
        if bp.exec_mode != "graphed":
            continue
        block = workload.by_name[bp.name]
        act = block.activation_bytes(bp.compute_dtype, workload.batch)
        per_class[block.block_class] = max(per_class.get(block.block_class, 0), act)
    return sum(act + profile.graph_pool_bytes_per_class for act in per_class.values())


ARENA_ALIGN_BYTES = 64  # each phase-lifetime block starts on a cache line in the runtime's phase arena


def phase_arena_bytes(workload: Workload, plan: Plan) -> tuple[int, int]:
    """The phase arena's (resident, resident-quantized) bytes: every phase lays its phase-lifetime blocks out in
    call order, each starting at a multiple of ARENA_ALIGN_BYTES, and the arena is the worst phase's layout.
    Alignment padding counts as resident, as the runtime's ledger counts it (runtime/device_memory.py lays the
    arena out the same way; tests check the two agree byte for byte)."""
    worst_total, worst_quantized = 0, 0
    for ph in workload.phases:
        offset = quantized = 0
        for name in ph.blocks:
            bp = plan.by_name[name]
            if bp.placement == "streamed" or bp.lifetime != "phase":
                continue
            offset += -offset % ARENA_ALIGN_BYTES
            n = resident_bytes(workload.by_name[name], bp)
            offset += n
            quantized += n if bp.placement == "resident-quantized" else 0
        if offset > worst_total:
            worst_total, worst_quantized = offset, quantized
    return worst_total - worst_quantized, worst_quantized


def peak_bytes(workload: Workload, plan: Plan, profile: DeviceProfile | None) -> dict[str, int]:
    """Predicted device bytes at the plan's peak, by ledger kind (KINDS), plus "reserve".

    Phase-lifetime blocks count for their largest phase; "reserve" is the profile's memory held
    outside the budget and is not part of the plan's total. profile None: the CPU runtime's bytes, no profile
    known (a loaded plan's own is not here): memory needs only the device's kind, not its rates.
    """
    gpu = profile is not None and profile.is_gpu
    by_kind = {k: 0 for k in KINDS}
    session = {"resident": 0, "resident-quantized": 0}
    scratch = 0
    for bp in plan.blocks:
        block = workload.by_name[bp.name]
        scratch = max(scratch, scratch_bytes(block, bp) if not (bp.placement == "streamed"
                                                                 and bp.dequant_on == "copy") else 0)
        if bp.placement != "streamed" and bp.lifetime == "session":
            session[bp.placement] += resident_bytes(block, bp)
    arena_resident, arena_quantized = phase_arena_bytes(workload, plan)
    by_kind["resident"] = session["resident"] + arena_resident
    by_kind["resident_quantized"] = session["resident-quantized"] + arena_quantized
    by_kind["slots"] = plan.execution.slots * slot_bytes(workload, plan) if plan.streamed() else 0
    # A GPU unpacks on the device: the packed blob of a block dequantized on load (resident) or by the
    # copy engine lands in a staging buffer first. The CPU backend unpacks straight from host memory.
    staging = max((workload.by_name[b.name].nbytes(b.format) for b in plan.blocks if needs_staging(b)),
                  default=0) if gpu else 0
    device_type = "cuda" if gpu else "cpu"
    by_kind["dequant_scratch"] = scratch + staging + sum(thread_staging_bytes(workload, side, device_type)
                                                         for side in dequant_threads(plan))
    by_kind["kv_cache"] = workload.kv_cache_bytes(plan.kv_dtype)
    by_kind["activations"] = max((workload.by_name[b.name].activation_bytes(b.compute_dtype, workload.batch)
                                  for b in plan.blocks), default=0)
    by_kind["workspace"] = GPU_WORKSPACE_BYTES if gpu else 0
    pool = graph_pool_bytes(workload, plan, profile) if gpu else 0
    if pool:  # only graphed plans carry the kind: an eager plan's peak is the document it always was
        by_kind["graph_pool"] = pool
    by_kind["reserve"] = profile.memory_reserve_bytes if profile is not None else 0  # outside the plan's budget; shown for the whole card
    return by_kind
