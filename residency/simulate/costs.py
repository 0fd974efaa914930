"""Per-call costs of one block under a plan on a device: copy, dequant and compute seconds.

Compute is a roofline, max(FLOPs ÷ matmul rate at this row count and matrix size — attention FLOPs at the
attention rate when the profile measured one — , bytes read ÷ device bandwidth), plus the block's non-matmul
ops: their activation elements at the profile's elementwise rate, and (CPU) their dispatch cost per op and the
caches' re-warm after each weight — or (GPU) the launch time when that is the longer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from residency.device.profile import DeviceProfile
from residency.formats import get_format
from residency.formats.dtypes import COMPUTE_DTYPE_BYTES, DTYPE_FORMAT
from residency.plan.plan import BlockPlan, Execution
from residency.workload.spec import BlockSpec

# When a catalog entry has no counted ops: kernel launches per call in eager PyTorch estimated as two
# per weight matrix (matmul/conv, then its epilogue) plus ~10 of norm, attention and residual glue;
# dispatched ops (views included) as twice that. Counted figures (pipelines/world_model/workload.py
# counts aten ops on the meta device) replace these.
KERNELS_PER_MATRIX = 2
KERNELS_PER_BLOCK = 10
OPS_PER_KERNEL = 2


@dataclass(frozen=True)
class CallCost:
    """Predicted cost of one block call, split by the stream it runs on: seconds and host->device bytes."""
    copy_s: float  # copy-engine work (async) for this call; 0 for resident blocks
    copy_bytes: int  # host->device bytes of this call
    dequant_s: float  # dequantization, on the compute stream unless dequant_on == "copy"
    compute_s: float  # compute-stream work, including dequant on compute and synchronous copies
    streamed: bool  # occupies a slot
    # part of compute_s, at its start: the load a copy_mode "sync" call makes on the compute stream itself (its
    # dequant too when that is on the copy side), which the runtime records as the copy engine's time and a stall
    blocking_copy_s: float = 0.0


def unpacks_fresh(bp: BlockPlan) -> bool:
    """Whether the block unpacks from a slot its packed bytes were just copied into (streamed, dequant on compute):
    in the cache, faster than from memory where the profile measured it (dequant_fresh_factor). A resident packed
    blob, and on the CPU a load that unpacks from the host blob (dequant on copy), read from memory."""
    return bp.placement == "streamed" and bp.dequant_on == "compute"


def dequant_s(block: BlockSpec, fmt: str, compute_dtype: str, profile: DeviceProfile, fresh: bool = False) -> float:
    """Time to turn the stored blob into compute-dtype weights (0 when they are already that): each tensor a
    dequant converts (the format's, and vectors fallen back to another) costs one unpack call at its own size
    (profile.dequant_s: the format's curve over tensor size where measured, else its rate plus a call cost; a tiny
    model's small tensors cost more by calls than by weights). `fresh` (unpacks_fresh): each format's time times the
    profile's dequant_fresh_factor (1.0 where not measured)."""
    if get_format(fmt).name == DTYPE_FORMAT[compute_dtype]:
        return 0.0
    seconds = 0.0
    for stored, calls, weights, sizes in block.dequant_work(fmt, compute_dtype):
        if stored not in profile.dequant_gweights_per_s:
            from residency.errors import ResidencyError

            raise ResidencyError(f"profile {profile.name!r} has no dequant rate for {stored}",
                                 hint="re-run `residency profile`, or plan without that format")
        t = profile.dequant_s(weights, stored, calls, sizes)
        seconds += t * profile.dequant_fresh_factor.get(stored, 1.0) if fresh else t
    return seconds


def copied_tensor_bytes(block: BlockSpec, fmt: str, compute_dtype: str, profile: DeviceProfile,
                        unpacks: bool) -> tuple[int, ...]:
    """Bytes of each tensor a load of the block stored as `fmt` copies host->device. All of them, except on the
    CPU backend for a load that unpacks (`unpacks`: a resident block, one streamed with dequant on the copy
    engine): there the unpack reads the converted tensors from the host blob itself
    (runtime.backend_cpu.execute_on_host) — their time is the dequant's — and only the plain ones are copied."""
    if profile.is_gpu or not unpacks:
        return block.tensor_nbytes(fmt)
    return block.plain_tensor_nbytes(fmt, compute_dtype)


def copy_bytes(block: BlockSpec, fmt: str, compute_dtype: str, profile: DeviceProfile, unpacks: bool) -> int:
    """Host->device bytes of one load (copied_tensor_bytes summed; the whole blob unless a CPU load unpacks)."""
    if profile.is_gpu or not unpacks:
        return block.nbytes(fmt)
    return sum(copied_tensor_bytes(block, fmt, compute_dtype, profile, unpacks))


def copy_s(block: BlockSpec, fmt: str, profile: DeviceProfile, execution: Execution, compute_dtype: str = "",
           unpacks: bool = False) -> float:
    """Seconds to move the block's `fmt` bytes host->device over the profile's link curve: the whole blob, or on
    the CPU for a load that `unpacks` into `compute_dtype` its plain tensors only (copied_tensor_bytes).

    One transfer of those bytes, or one per tensor when the execution copies tensors separately.
    """
    if not execution.per_tensor_copies:
        return profile.h2d_s(copy_bytes(block, fmt, compute_dtype, profile, unpacks), execution.pinned)
    sizes = copied_tensor_bytes(block, fmt, compute_dtype, profile, unpacks)
    return sum(profile.h2d_s(n, execution.pinned) for n in sizes)


def compute_s(block: BlockSpec, bp: BlockPlan, profile: DeviceProfile, context_frames: int,
              kv_read: bool, kv_dtype: str, batch: int) -> float:
    """Seconds of the block's forward on the compute stream (matmul, memory roof, elementwise, launches), times
    the profile's calibrated compute_scale of the block's class or component (1.0 when it has none).

    `context_frames` latent frames of KV are read when `kv_read`; `batch` multiplies tokens and
    fixed FLOPs. GPU: launch time hides under device work; CPU: per-op dispatch time adds to it.
    The scale is applied here, not in call_cost alone, so the lower bound and the policies' estimates, which
    call this directly, see the same compute as the simulator.
    """
    weight_bytes = block.params * COMPUTE_DTYPE_BYTES[bp.compute_dtype]
    if block.own_dtypes:  # tensors kept in their own dtype (a bf16 model's fp32 norms) are read at its width
        weight_bytes += sum(math.prod(shape) * (COMPUTE_DTYPE_BYTES[own] - COMPUTE_DTYPE_BYTES[bp.compute_dtype])
                            for (_, shape), own in zip(block.tensors, block.tensor_own_dtypes, strict=True) if own)
    kv_bytes = context_frames * block.kv_bytes_per_frame(kv_dtype, batch) if kv_read else 0
    flops = block.flops(context_frames if kv_read else 0, batch)
    # Token-independent FLOPs (adaLN projections of the conditioning) run one row per batch item: at that
    # row count a matmul reads its whole weight for a few FLOPs, several times slower per FLOP than the
    # token rows (measured on the CPU: 7 vs 48 GFLOP/s at 1 vs 16 rows).
    fixed = block.fixed_flops * batch
    rows = block.tokens * batch
    if bp.compute_dtype in profile.attention_tflops:
        # Attention (the pair FLOPs: scores and weighted sums) at the profile's measured attention rate: on the CPU
        # fused SDPA runs at ~0.5× a 256-row matmul's FLOP rate (issue 16: 2.1 vs 1.1 ms predicted per Flux block)
        token = block.flops_per_token * rows
        pair = max(flops - fixed - token, 0.0)
        matmul = _matmul_s(block, token, rows, bp.compute_dtype, profile)
        matmul += profile.attention_s(pair, rows, bp.compute_dtype)
    else:  # no attention curve: attention FLOPs at the matmul rate, the expression of profiles before it
        matmul = _matmul_s(block, flops - fixed, rows, bp.compute_dtype, profile)
    if fixed:
        matmul += _matmul_s(block, fixed, batch, bp.compute_dtype, profile)
    roof = max(matmul, (weight_bytes + kv_bytes) / (profile.device_memory_gbps * 1e9))
    device = roof + _elementwise_s(block, batch, COMPUTE_DTYPE_BYTES[bp.compute_dtype], profile) * _fused(bp, profile)
    # A GPU queues kernels asynchronously: the host's launch time hides under device work unless it is
    # the longer of the two. On the CPU backend every dispatched op (views too) runs on the computing
    # thread, at the profile's measured per-op cost: it adds, and so does the re-warm of the caches each weight
    # evicts (rewarm_s; 0 for a profile that did not measure it).
    if profile.is_gpu:
        seconds = max(device, launch_s(block, bp.exec_mode, profile))
    else:
        seconds = device + dispatch_s(block, bp.exec_mode, profile) + rewarm_s(block, profile)
    return seconds * compute_scale_of(profile, block)  # × 1.0 is exact: uncalibrated is unchanged


def _fused(bp: BlockPlan, profile: DeviceProfile) -> float:
    """Share of the non-matmul ops' memory traffic a compiled block still moves on a GPU: inductor fuses pointwise
    chains into one kernel that reads its inputs once and writes one output (2 reads + 2 writes -> 1 + 1,
    https://pytorch.org/docs/stable/torch.compiler_get_started.html), taken as compiled_dispatch_fraction,
    the share of its kernels left. 1.0 when eager, on the CPU (tools/bench_compile.py measured no gain there to
    claim), or without the figure."""
    if bp.exec_mode == "compiled" and profile.is_gpu and profile.compiled_known():
        return profile.compiled_dispatch_fraction
    return 1.0


def launch_s(block: BlockSpec, exec_mode: str, profile: DeviceProfile) -> float:
    """GPU: host seconds to issue one call's kernels under `exec_mode`.

    eager: kernels × launch_overhead_us; compiled: inductor fuses pointwise chains, so kernels ×
    compiled_dispatch_fraction launches; graphed: one captured graph replays every kernel at
    graph_replay_us_per_kernel. A mode whose figure the profile lacks costs as eager (no gain is claimed
    without a source). What fusion saves of the device work is in `_fused`.
    """
    kernels = kernels_per_call(block)
    if exec_mode == "graphed" and profile.graph_known():
        return kernels * profile.graph_replay_us_per_kernel * 1e-6
    if exec_mode == "compiled" and profile.compiled_known():
        return kernels * profile.compiled_dispatch_fraction * profile.launch_overhead_us * 1e-6
    return kernels * profile.launch_overhead_us * 1e-6


def dispatch_s(block: BlockSpec, exec_mode: str, profile: DeviceProfile) -> float:
    """CPU: seconds the computing thread spends dispatching one call's ops under `exec_mode`: eager ops ×
    launch_overhead_us; compiled pays compiled_dispatch_fraction of it when the profile has that figure.
    There are no graphs on the CPU: `graphed` costs as eager."""
    ops = ops_per_call(block)
    if exec_mode == "compiled" and profile.compiled_known():
        return ops * profile.compiled_dispatch_fraction * profile.launch_overhead_us * 1e-6
    return ops * profile.launch_overhead_us * 1e-6


def rewarm_s(block: BlockSpec, profile: DeviceProfile) -> float:
    """CPU: seconds one call's non-matmul ops lose re-filling the caches that its weights evicted, one matmul per
    weight matrix (profile.rewarm_s; measured 120-250 µs after a 1024² fp32 weight on this CPU, where the per-op and
    matmul figures are timed warm: a Wan block's 11 weights lose 1.5-2.5 ms of its ~30). 0 on a GPU or unmeasured."""
    if profile.matmul_rewarm_us is None or profile.is_gpu:
        return 0.0
    return sum(profile.rewarm_s(m) for m in block.matrix_elements)


def compute_scale_of(profile: DeviceProfile, block: BlockSpec) -> float:
    """The profile's calibrated compute scale for `block`: its own ("dit.blocks.7"), else its class's
    ("dit.blocks.*"), else its component's ("dit"), else 1.0. Not by placement: on this CPU a block computes
    as fast from a slot it was just copied into as from resident memory (1.65 vs 1.64 ms per DiT block of the
    shipped model)."""
    scales = profile.compute_scale
    if not scales:
        return 1.0
    if block.name in scales:
        return scales[block.name]
    return scales.get(block.block_class, scales.get(block.component, 1.0))


def _elementwise_s(block: BlockSpec, batch: int, element_bytes: int, profile: DeviceProfile) -> float:
    """The non-matmul ops' activation traffic, each size class at its rate (a batch scales the elements and
    every tensor, so the classes too)."""
    if not block.activation_elements_by_size:
        return profile.elementwise_s(block.activation_elements_per_call * batch, element_bytes)
    return sum(profile.elementwise_s(n * batch, element_bytes, c * batch) for c, n in block.activation_elements_by_size)


def _matmul_s(block: BlockSpec, flops: float, rows: int, dtype: str, profile: DeviceProfile) -> float:
    """FLOPs shared among the block's weight matrices by size (FLOPs per row ∝ elements), each at the rate
    of its size when the profile has a small-weight curve — a conv2d kernel at the profile's conv rate for its
    size when it has a conv curve; else all at the profile's one rate."""
    mats = block.matrix_elements
    convs = dtype in profile.conv_tflops and any(block.conv2d_kernels)
    if (dtype not in profile.matmul_small_tflops and not convs) or not mats:
        return profile.matmul_s(flops, rows, dtype)
    per_element = flops / sum(mats)
    return sum(profile.conv_s(per_element * m, m, rows, dtype) if convs and conv else
               profile.matmul_s(per_element * m, rows, dtype, m)
               for m, conv in zip(mats, block.conv2d_kernels, strict=True))


def kernels_per_call(block: BlockSpec) -> int:
    """Kernel launches per call: the workload's traced count, else estimated from its matrices."""
    if block.kernels_per_call:
        return block.kernels_per_call
    return KERNELS_PER_MATRIX * sum(1 for _, shape in block.tensors if len(shape) >= 2) + KERNELS_PER_BLOCK


def ops_per_call(block: BlockSpec) -> int:
    """Dispatched torch ops per call (views included): traced count, else kernels x OPS_PER_KERNEL."""
    return block.ops_per_call or OPS_PER_KERNEL * kernels_per_call(block)


def call_cost(block: BlockSpec, bp: BlockPlan, profile: DeviceProfile, execution: Execution,
              context_frames: int, kv_read: bool, kv_dtype: str, batch: int) -> CallCost:
    """The predicted CallCost of one call of `block` under its BlockPlan `bp`.

    Resident: compute only; resident-quantized: plus dequant; streamed: plus the copy, on the copy
    engine (async) or on compute (copy_mode "sync"), with the execution's host sync per onload.
    The profile's compute_scale scales the block's compute only (in compute_s); dequant and copy are not scaled.
    """
    # the host time a calibration found between calls (0.0 otherwise: every figure below unchanged)
    base = compute_s(block, bp, profile, context_frames, kv_read, kv_dtype, batch) + profile.call_host_us * 1e-6
    if bp.placement == "resident":
        return CallCost(0.0, 0, 0.0, base, False)
    deq = dequant_s(block, bp.format, bp.compute_dtype, profile, unpacks_fresh(bp))
    if bp.placement == "resident-quantized":
        return CallCost(0.0, 0, deq, base + deq, False)
    unpacks = bp.dequant_on == "copy"  # the load lands in the compute dtype (as the runtime's, sync or not)
    nbytes = copy_bytes(block, bp.format, bp.compute_dtype, profile, unpacks)
    move = copy_s(block, bp.format, profile, execution, bp.compute_dtype, unpacks)
    # the execution's host sync per onload (a peer's), and the host time a calibration found per streamed call
    sync_wait = (execution.host_sync_per_onload_us + profile.streamed_call_host_us) * 1e-6
    if execution.copy_mode == "sync":
        return CallCost(0.0, nbytes, deq, move + deq + base + sync_wait, True,
                        blocking_copy_s=move + (deq if bp.dequant_on == "copy" else 0.0))
    if bp.dequant_on == "copy":
        return CallCost(move + deq, nbytes, deq, base + sync_wait, True)
    return CallCost(move, nbytes, deq, base + deq + sync_wait, True)


def load_cost(block: BlockSpec, bp: BlockPlan, profile: DeviceProfile, execution: Execution) -> float:
    """Loading a resident block: copy its blob, and dequantize it once if it lives dequantized (on the CPU that
    load copies only the plain tensors: copy_s)."""
    move = copy_s(block, bp.format, profile, execution, bp.compute_dtype, bp.placement == "resident")
    if bp.placement == "resident":
        move += dequant_s(block, bp.format, bp.compute_dtype, profile)
    return move


def resident_bytes(block: BlockSpec, bp: BlockPlan) -> int:
    """Device bytes a resident block holds: dequantized weights, or its packed blob."""
    if bp.placement == "resident":
        fallback = block.nbytes(DTYPE_FORMAT[bp.compute_dtype])
        return fallback
    return block.nbytes(bp.format)


def scratch_bytes(block: BlockSpec, bp: BlockPlan) -> int:
    """Compute-dtype buffer a per-call dequant writes into (0 when none is needed): every tensor whose
    stored format is not the compute dtype — quantized ones, and BF16 fallback vectors under fp32."""
    if bp.placement == "resident":
        return 0
    # a tensor of its own dtype (a bf16 model's fp32 norm) is viewed in place: no scratch
    converted = sum(math.prod(shape) for shape, _ in block.converted(get_format(bp.format).name, bp.compute_dtype))
    return converted * COMPUTE_DTYPE_BYTES[bp.compute_dtype]
