"""What each block could be: (placement, format, dequant side) with its per-frame time, memory and loss.

Identical blocks (same tensors, tokens, FLOP coefficients and calls) form one class, so the solver
chooses how many of a class take each option instead of one binary per block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

from policies.base import PlanRequest, weights_format
from policies.ours.modes import choose_modes, frame_compute_s
from residency.plan import BlockPlan, Execution
from residency.simulate.costs import DTYPE_FORMAT, copy_s, dequant_s, scratch_bytes
from residency.simulate.memory import dequant_threads, thread_staging_bytes
from residency.simulate.quality import block_error
from residency.workload import BlockSpec, Workload

# Formats the planner considers, best quality first. Dominated ones are left out: legacy Q4_0/Q4_1/
# Q5_0/Q5_1 and NF4 have a higher error than the K-quant of equal or fewer bits (NF4: 4.5 bits,
# ~0.10 relative RMS vs Q4_K's ~0.08 on the probe matrix of residency.simulate.quality).
CANDIDATE_FORMATS = ("BF16", "FP8", "Q8_0", "Q6_K", "Q5_K", "Q4_K")


@dataclass(frozen=True)
class Option:
    """One way to hold a block (placement, format, dequant side) with its per-frame cost in s and bytes."""
    placement: str  # resident | resident-quantized | streamed
    format: str
    dequant_on: str  # compute | copy
    compute_s: float  # per frame on the compute stream (all calls of one block)
    copy_s: float  # per frame on the copy engine
    device_bytes: int  # resident memory of one block (0 when streamed)
    slot_bytes: int  # what one slot must hold for this block (0 unless streamed)
    scratch_bytes: int  # dequant scratch this block needs (0 when none)
    loss: float  # quality loss of one block
    staging_bytes: int = 0  # GPU: device buffer its packed blob lands in to be unpacked (0 when none)
    exec_mode: str = "eager"  # the block class's execution mode (policies.ours.modes), in compute_s already
    # The unpack staging (residency.formats.staging) of the thread that unpacks this block: per call on the
    # compute side, at load on the copy side. Each thread holds one, sized for its largest tensor (≤ 0.5-1.5
    # MiB): nothing beside a GiB model, but ~3% of a tiny model's budget, which the simulator counts.
    compute_unpack_bytes: int = 0
    copy_unpack_bytes: int = 0

    def block_plan(self, name: str, compute_dtype: str, lifetime: str) -> BlockPlan:
        """The BlockPlan for block `name` under this option."""
        return BlockPlan(name, self.placement, self.format, compute_dtype, lifetime, self.dequant_on,
                         exec_mode=self.exec_mode)


@dataclass(frozen=True)
class BlockClass:
    """Blocks with identical shapes, FLOPs and calls per frame, planned together, and their options."""
    blocks: tuple[str, ...]  # members in execution order
    calls_per_frame: int  # 0: used only in session phases (encode)
    options: tuple[Option, ...]


def _with_unpack_staging(w: Workload, o: Option, b: BlockSpec, req: PlanRequest) -> Option:
    """`o` with the unpack staging its block needs on each side, as residency.simulate.memory counts it."""
    bp = o.block_plan(b.name, req.compute_dtype, "session")
    device_type = "cuda" if req.profile.is_gpu else "cpu"
    per_call, on_load = dequant_threads(SimpleNamespace(blocks=(bp,)))  # the simulator's rule, for one block
    return replace(o, compute_unpack_bytes=thread_staging_bytes(w, per_call, device_type),
                   copy_unpack_bytes=thread_staging_bytes(w, on_load, device_type))


def _signature(w: Workload, b: BlockSpec) -> tuple:
    return (b.component, tuple(s for _, s in b.tensors), b.tokens, b.fixed_flops, b.flops_per_token,
            b.self_attn_flops_per_token_pair, b.context_attn_flops_per_token_pair, b.context_tokens_per_frame,
            b.kv_channels_per_token, w.calls_per_frame(b.name))


def block_options(w: Workload, b: BlockSpec, req: PlanRequest, execution: Execution, kv_dtype: str,
                  formats: tuple[str, ...], exec_mode: str = "eager") -> list[Option]:
    """The placements x formats a frame-loop block may take in `exec_mode`, each scored (s per frame, bytes,
    loss).

    Formats the profile has no dequant rate for, or that no tensor of the block takes, are skipped.
    """
    dtype = req.compute_dtype
    plain = weights_format(dtype)
    calls = w.calls_per_frame(b.name)
    base = BlockPlan(b.name, "resident", plain, dtype, exec_mode=exec_mode)
    k = frame_compute_s(w, b, base, req, kv_dtype)
    sens = req.sensitivity or {}

    def loss(fmt: str) -> float:
        measured = sens.get(b.name, {}).get(fmt)
        return measured if measured is not None else block_error(w, b.name, fmt)

    compute_bytes = b.nbytes(plain)
    out = [Option("resident", plain, "compute", k, 0.0, compute_bytes, 0, 0, loss(plain), exec_mode=exec_mode)]
    for fmt in formats:
        if fmt != plain and (fmt not in req.profile.dequant_gweights_per_s or not b.quantized_weights(fmt)):
            continue  # no rate on this device, or every tensor would fall back to BF16 anyway
        deq = calls * dequant_s(b, fmt, dtype, req.profile)
        deq_fresh = calls * dequant_s(b, fmt, dtype, req.profile, fresh=True)  # streamed: from the slot just filled
        scratch = scratch_bytes(b, BlockPlan(b.name, "streamed", fmt, dtype))
        move = calls * copy_s(b, fmt, req.profile, execution)
        if fmt != plain:
            out.append(Option("resident-quantized", fmt, "compute", k + deq, 0.0, b.nbytes(fmt), 0, scratch,
                              loss(fmt), exec_mode=exec_mode))
        out.append(Option("streamed", fmt, "compute", k + deq_fresh, move, 0, b.nbytes(fmt), scratch, loss(fmt),
                          exec_mode=exec_mode))
        if fmt != plain and execution.copy_mode == "async":
            # dequant beside compute on the copy engine: the slot then holds compute-dtype weights, and a
            # GPU stages the packed blob on the device first (residency.simulate.memory.needs_staging)
            stage = b.nbytes(fmt) if req.profile.is_gpu else 0
            unpacking = calls * copy_s(b, fmt, req.profile, execution, dtype, unpacks=True)  # CPU: plain part only
            out.append(Option("streamed", fmt, "copy", k, unpacking + deq, 0, compute_bytes, 0, loss(fmt), stage,
                              exec_mode=exec_mode))
    return [_with_unpack_staging(w, o, b, req) for o in out]


def session_options(b: BlockSpec, req: PlanRequest, w: Workload, exec_mode: str = "eager") -> list[Option]:
    """Blocks used only at session start: resident for their phase at full precision, else streamed."""
    plain = weights_format(req.compute_dtype)
    out = [Option("resident", plain, "compute", 0.0, 0.0, b.nbytes(plain), 0, 0, block_error(w, b.name, plain),
                  exec_mode=exec_mode),
           Option("streamed", plain, "compute", 0.0, 0.0, 0, b.nbytes(plain), 0, block_error(w, b.name, plain),
                  exec_mode=exec_mode)]
    return [_with_unpack_staging(w, o, b, req) for o in out]


def block_classes(w: Workload, req: PlanRequest, execution: Execution, kv_dtype: str,
                  formats: tuple[str, ...] = CANDIDATE_FORMATS) -> list[BlockClass]:
    """The workload's blocks grouped into classes of identical blocks in one execution mode, each with its
    options."""
    modes = {c: ch.mode for c, ch in choose_modes(req, kv_dtype).items()}
    groups: dict[tuple, list[BlockSpec]] = {}
    for b in w.blocks:
        groups.setdefault((_signature(w, b), modes[b.block_class]), []).append(b)
    classes = []
    for (_, mode), members in groups.items():
        first = members[0]
        calls = w.calls_per_frame(first.name)
        if calls:
            opts = block_options(w, first, req, execution, kv_dtype, formats, mode)
        else:
            opts = session_options(first, req, w, mode)
        if req.sensitivity:  # measured losses are per block: a class holds identical blocks only if equal
            classes += [BlockClass((m.name,), calls, tuple(block_options(w, m, req, execution, kv_dtype, formats,
                                                                         mode)
                                                           if calls else session_options(m, req, w, mode)))
                        for m in members]
        else:
            classes.append(BlockClass(tuple(m.name for m in members), calls, tuple(opts)))
    return classes


__all__ = ["CANDIDATE_FORMATS", "DTYPE_FORMAT", "BlockClass", "Option", "block_classes"]
