"""The physical floor of a steady latent frame: a relaxation over where each block could live.

At the plan's storage formats, modes and ring depth, each frame-loop block may be resident (dequantized), resident
packed (dequantized per call) or streamed (copied per call at peak link rate, dequantized on either engine), in any
fraction; each block run only at session start, resident for its phase or streamed. What every such plan also pays
is charged exactly, not as a fraction: the ring's slots (each as large as the largest streamed block), the dequant
scratch and (GPU) the staging of a packed blob, each the largest over the blocks that need one, and the session
phase's memory beside the frame loop's resident blocks. A copy hides under compute of the whole frame, except that a
frame phase's copies hide only under that phase's compute, beyond the few calls the ring can copy ahead of it. No real
plan at those formats beats it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, milp

from residency.device.profile import DeviceProfile
from residency.formats.dtypes import DTYPE_FORMAT
from residency.plan.plan import BlockPlan, Plan
from residency.simulate.costs import compute_s, copy_bytes, dequant_s, scratch_bytes
from residency.simulate.lp_rows import LpRows
from residency.simulate.memory import GPU_WORKSPACE_BYTES, peak_bytes
from residency.workload.spec import Workload


def compute_floor_s(workload: Workload, plan: Plan, profile: DeviceProfile, block: str | None = None) -> float:
    """Calls of a frame (of one block, or all) as if resident at the plan's compute dtype."""
    return sum(_phase_compute_s(workload, plan, profile, block))


def _phase_compute_s(workload: Workload, plan: Plan, profile: DeviceProfile, block: str | None = None) -> list[float]:
    """compute_floor_s per frame phase, in the order of workload.frame_phases()."""
    out = []
    for ph in workload.frame_phases():
        total = 0.0
        for p in ph.passes:
            kv_read = p.kv != "none"
            for name in p.blocks:
                if block is None or name == block:
                    total += workload.count(p) * compute_s(workload.by_name[name], plan.by_name[name], profile,
                                                           workload.context_frames, kv_read, plan.kv_dtype,
                                                           workload.batch)
        out.append(total)
    return out


def _phase_calls(workload: Workload, block: str) -> list[int]:
    """Calls of `block` in each frame phase (workload.frame_phases() order)."""
    return [sum(workload.count(p) for p in ph.passes if block in p.blocks) for ph in workload.frame_phases()]


def interference_coefficients(profile: DeviceProfile) -> tuple[float, float]:
    """(a_k, a_c) of the frame-time floor T ≥ max(K + a_k·C, C + a_c·K) for copy work C and compute work K [s].

    While both engines run for a time τ, the copy advances τ/s_k and compute τ/s_c (s_k, s_c: the profile's
    slowdown factors); the rest of each runs alone. So T ≥ τ + (C − τ/s_k) + (K − τ/s_c) = C + K − τ·g with
    g = 1/s_k + 1/s_c − 1, and τ ≤ min(s_k·C, s_c·K) (neither engine can do more than its work beside the other).
    With g ≥ 0 the least T takes the largest τ: T = K + s_k·(1 − 1/s_c)·C when s_k·C ≤ s_c·K, else
    C + s_c·(1 − 1/s_k)·K, and the larger of the two expressions is always that one. With g < 0 running both at
    once is slower than in turn, the least T is C + K. Both cases: a_k = min(1, s_k·(1 − 1/s_c)) and
    a_c = min(1, s_c·(1 − 1/s_k)) (g ≥ 0 exactly when each product is ≤ 1).

    A profile with no measured slowdowns has s_k = s_c = 2 − o, where s·(1 − 1/s) = s − 1 = 1 − o: the symmetric
    (1 − o) is returned as written, so its bounds stay bit-identical to those of the overlap-only model.
    """
    if profile.copy_slowdown <= 0 and profile.compute_slowdown <= 0:
        shared = 1.0 - profile.copy_compute_overlap
        return shared, shared
    s_k, s_c = profile.copy_slowdown_factor(), profile.compute_slowdown_factor()
    return min(1.0, s_k * (1.0 - 1.0 / s_c)), min(1.0, s_c * (1.0 - 1.0 / s_k))


# The memory that is a maximum over blocks (residency.simulate.memory.peak_bytes): one ring slot, the dequant
# scratch, (GPU) the staging of a packed blob unpacked on the device
MAX_TERMS = ("slot", "scratch", "staging")
# Levels of a maximum smaller than this share of the room are not charged (a relaxation, so still a bound): each
# level is a binary of the MILP, and the small ones (VAE layers, embeddings) cost solver time for nothing.
MIN_LEVEL_SHARE = 0.005
# HiGHS's presolve returned a wrong optimum on one catalog case (wan-causal-1.3b on the RTX 3060 at its full memory:
# 1.49 % above a feasible point's T, with mip_rel_gap 0); without it the same MILP solves right and faster.
HIGHS_OPTIONS = {"mip_rel_gap": 0.0, "presolve": False}


@dataclass(frozen=True)
class _Column:
    """One way a block could live: its fraction's compute and copy per frame [ms] and memory [bytes]."""

    block: int  # index of its block: a block's columns sum to one
    compute_ms: float = 0.0
    copy_ms: float = 0.0
    frame_bytes: int = 0  # held through the frame loop (and the session phases)
    phase_bytes: int = 0  # held only while its session phase runs
    phase: int = -1  # that session phase (-1: none)
    maxima: dict[str, int] = field(default_factory=dict)  # its term of each MAX_TERMS it needs (absent: none)
    # compute_ms and copy_ms split over the frame phases (empty: a session block's, none in the frame)
    phase_compute_ms: tuple[float, ...] = ()
    phase_copy_ms: tuple[float, ...] = ()
    call_copy_ms: float = 0.0  # copy of one call: what one ring slot can hold ahead of its phase


def _frame_columns(i: int, workload: Workload, plan: Plan, profile: DeviceProfile, name: str) -> list[_Column]:
    """Resident, packed, streamed (dequant on compute), streamed (dequant on copy) for frame-loop block `name`."""
    block, bp = workload.by_name[name], plan.by_name[name]
    calls = workload.calls_per_frame(name)
    link = max(profile.link["h2d_pinned"].y) * 1e9
    k_by_phase = [s * 1e3 for s in _phase_compute_s(workload, plan, profile, name)]
    share = [c / calls for c in _phase_calls(workload, name)]
    k = sum(k_by_phase)
    d = calls * dequant_s(block, bp.format, bp.compute_dtype, profile) * 1e3
    d_fresh = calls * dequant_s(block, bp.format, bp.compute_dtype, profile, fresh=True) * 1e3  # from its slot
    move = calls * block.nbytes(bp.format) / link * 1e3
    # dequant on the copy engine: on the CPU that load copies only its plain tensors (costs.copied_tensor_bytes)
    unpacking = calls * copy_bytes(block, bp.format, bp.compute_dtype, profile, True) / link * 1e3
    plain, packed = block.nbytes(DTYPE_FORMAT[bp.compute_dtype]), block.nbytes(bp.format)
    scratch = scratch_bytes(block, BlockPlan(name, "streamed", bp.format, bp.compute_dtype))
    # a GPU unpacks a blob that is not in the compute dtype's format in a device staging buffer: at load (resident)
    # and on the copy engine (streamed, dequant on copy)
    staging = packed if profile.is_gpu and bp.format != DTYPE_FORMAT[bp.compute_dtype] else 0

    def column(dequant_ms: float, copy_ms: float, frame_bytes: int, maxima: dict[str, int]) -> _Column:
        return _Column(i, k + dequant_ms, copy_ms, frame_bytes, maxima=maxima,
                       phase_compute_ms=tuple(kp + dequant_ms * sh for kp, sh in zip(k_by_phase, share, strict=True)),
                       phase_copy_ms=tuple(copy_ms * sh for sh in share), call_copy_ms=copy_ms / calls)

    return [column(0.0, 0.0, plain, {"staging": staging}),
            column(d, 0.0, packed, {"scratch": scratch}),
            column(d_fresh, move, 0, {"slot": packed, "scratch": scratch}),
            column(0.0, unpacking + d, 0, {"slot": plain, "staging": staging})]


def _own_column(bp: BlockPlan, frame: bool) -> int:
    """Which of its block's columns the plan's own placement takes (the order of _frame_columns, _session_columns)."""
    if not frame:
        return int(bp.placement == "streamed")
    if bp.placement == "streamed":
        return 3 if bp.dequant_on == "copy" else 2
    return int(bp.placement == "resident-quantized")


def _session_columns(i: int, block_bytes: int, phase: int) -> list[_Column]:
    """A block run only at session start (at its smaller size, packed or not): resident for its phase, or streamed
    (no frame time; a slot of its size)."""
    return [_Column(i, phase_bytes=block_bytes, phase=phase), _Column(i, maxima={"slot": block_bytes})]


def _columns(workload: Workload, plan: Plan, profile: DeviceProfile) -> tuple[list[_Column], list[int], int]:
    """Every block's columns, the plan's own column of each block, and the number of session phases."""
    frame_blocks = list(dict.fromkeys(b for ph in workload.frame_phases() for b in ph.blocks))
    cols = [c for i, name in enumerate(frame_blocks) for c in _frame_columns(i, workload, plan, profile, name)]
    own = [4 * i + _own_column(plan.by_name[name], True) for i, name in enumerate(frame_blocks)]
    seen = set(frame_blocks)
    phases = workload.session_phases()
    for p, ph in enumerate(phases):
        for name in dict.fromkeys(ph.blocks):
            if name in seen:  # a frame-loop block, or one an earlier session phase holds
                continue
            seen.add(name)
            block, bp = workload.by_name[name], plan.by_name[name]
            own.append(len(cols) + _own_column(bp, False))
            cols += _session_columns(len(own) - 1, min(block.nbytes(bp.format),
                                                       block.nbytes(DTYPE_FORMAT[bp.compute_dtype])), p)
    return cols, own, len(phases)


def _window_ms(k: float, c: float, a_k: float, a_c: float) -> float:
    """The least time in which compute does work k and the copy engine work c beside it [ms]."""
    return max(k, k + a_k * c, c + a_c * k)


def _ahead_ms(cols: list[_Column], n_phases: int, slots: int) -> list[float]:
    """Per frame phase: the most copy work of its calls that can be done before it starts [ms]. A streamed call's
    copy holds a ring slot until the call has run, and no call of the phase runs before the phase starts, so at
    most `slots` of its calls are copied ahead (each at most the phase's largest call copy); the rest of its
    copies fall between its first call's start and its last call's end."""
    return [slots * max((c.call_copy_ms for c in cols if c.phase_copy_ms and c.phase_copy_ms[p] > 0), default=0.0)
            for p in range(n_phases)]


def _frame_ms(cols: list[_Column], chosen: list[int], a_k: float, a_c: float, ahead_ms: list[float]) -> float:
    """T of whole columns, one per block: max(K + a_k·C, C + a_c·K) over the frame, and at least the sum over frame
    phases of that window's least time for each phase's compute and its copy not done ahead."""
    k = sum(cols[j].compute_ms for j in chosen)
    c = sum(cols[j].copy_ms for j in chosen)
    phased = 0.0
    for p, ahead in enumerate(ahead_ms):
        kp = sum(cols[j].phase_compute_ms[p] for j in chosen if cols[j].phase_compute_ms)
        cp = sum(cols[j].phase_copy_ms[p] for j in chosen if cols[j].phase_copy_ms)
        phased += _window_ms(kp, max(0.0, cp - ahead), a_k, a_c)
    return max(_window_ms(k, c, a_k, a_c), phased)


def _level_rows(rows: LpRows, cols: list[_Column], levels: dict[str, list[int]], z: dict[tuple[str, int], int],
                slots: int, m_unit: float) -> dict[int, float]:
    """z[t, v] = 1 when the plan's largest term t is at least v: monotone in v, and a column whose term is v or more
    is open only when z[t, v] is. Returns the memory each z adds (the step between its level and the one below)."""
    charged = {}
    for t in MAX_TERMS:
        for i, v in enumerate(levels[t]):
            lower = levels[t][i - 1] if i else 0
            if lower:
                rows.add({z[t, v]: 1.0, z[t, lower]: -1.0}, -np.inf, 0.0)
            charged[z[t, v]] = (v - lower) * (slots if t == "slot" else 1) / m_unit
        for j, c in enumerate(cols):
            # a term between two levels is charged as the lower one (a relaxation): small terms not at all
            level = max((v for v in levels[t] if v <= c.maxima.get(t, 0)), default=0)
            if level:
                rows.add({j: 1.0, z[t, level]: -1.0}, -np.inf, 0.0)
    return charged


def _phase_rows(rows: LpRows, cols: list[_Column], ahead_ms: list[float], a_k: float, a_c: float, t_col: int,
                t_unit: float) -> None:
    """T ≥ Σ_p T_p, each T_p (column t_col + 1 + p) at least the least time of phase p's window (_window_ms) for its
    compute K_p and its copy not done ahead, C_p − ahead_p (or none: T_p ≥ K_p). Every frame phase's calls run in a
    window of the frame's time that no other phase's calls share, and all their copies but those done ahead fall in
    it; the whole-frame rows let a copy hide under any compute of the frame, a text encoder's large, cheap layers
    under the denoiser's compute, which no ring of `slots` slots can do."""
    if not ahead_ms:
        return
    phase_cols = range(t_col + 1, t_col + 1 + len(ahead_ms))
    rows.add({t_col: -1.0, **{tp: 1.0 for tp in phase_cols}}, -np.inf, 0.0)
    for p, (tp, ahead) in enumerate(zip(phase_cols, ahead_ms, strict=True)):
        k = {j: c.phase_compute_ms[p] / t_unit for j, c in enumerate(cols) if c.phase_compute_ms}
        kc = {j: (c.phase_compute_ms[p] + a_k * c.phase_copy_ms[p]) / t_unit for j, c in enumerate(cols)
              if c.phase_compute_ms}
        ck = {j: (c.phase_copy_ms[p] + a_c * c.phase_compute_ms[p]) / t_unit for j, c in enumerate(cols)
              if c.phase_compute_ms}
        rows.add({**k, tp: -1.0}, -np.inf, 0.0)
        rows.add({**kc, tp: -1.0}, -np.inf, a_k * ahead / t_unit)
        rows.add({**ck, tp: -1.0}, -np.inf, ahead / t_unit)


def lower_bound_s(workload: Workload, plan: Plan, profile: DeviceProfile) -> float:
    """Seconds: min T with T ≥ K + a_k·C and T ≥ C + a_c·K (compute K, copy C; a_k, a_c from
    interference_coefficients) — even a perfect pipeline pays the interference the device measured — and, where the
    frame has several phases, T ≥ the sum over them of the same for each phase's compute and its copy the ring
    cannot do ahead of it (_phase_rows: the text encoder of an image pipeline copies far more than it computes) —
    over
    fractional placements at the plan's formats, modes and prefetch depth, within the VRAM budget (or the plan's own
    peak, where that is more) in the frame loop and in each session phase.

    Each of MAX_TERMS is a maximum over blocks, so it is not relaxed: a binary per level it could take, a block's
    fraction may use a column only once its level is reached, and the level's bytes are charged whole (a slot's once
    per ring slot), as every real plan pays them. No plan at those formats, modes and depth has a shorter simulated
    steady frame (tests/test_bound_brute_force.py holds every plan of a small workload to it) — among plans that
    keep frame-loop blocks for the session or stream them: ours, and every peer but diffusers' model offload, which
    reloads whole components each frame (a copy without a slot, not modelled here).
    Cost: one small MILP (~20-80 ms on the catalog models; HiGHS closes it at the root).
    """
    cols, own, n_phases = _columns(workload, plan, profile)
    a_k, a_c = interference_coefficients(profile)
    fixed = workload.kv_cache_bytes(plan.kv_dtype) + max(
        (workload.by_name[b.name].activation_bytes(b.compute_dtype, workload.batch) for b in plan.blocks),
        default=0) + (GPU_WORKSPACE_BYTES if profile.is_gpu else 0)
    # a plan over its budget is bounded within its own memory, so its own placement is always a feasible point
    room = max(plan.budget.vram_bytes, sum(v for k, v in peak_bytes(workload, plan, profile).items()
                                           if k != "reserve")) - fixed
    fastest = [math.inf] * len(own)
    for c in cols:
        fastest[c.block] = min(fastest[c.block], c.compute_ms)
    resident_ms = sum(fastest)
    slots = plan.execution.slots
    # one frame phase: its window is the frame, where the whole-frame rows already bind
    n_frame = len(workload.frame_phases())
    ahead_ms = _ahead_ms(cols, n_frame, slots) if n_frame > 1 else []
    own_ms = _frame_ms(cols, own, a_k, a_c, ahead_ms)  # the plan's own placement: the optimum is at most this
    if room < 0:  # nothing fits at any placement: what no plan beats at any memory
        return resident_ms / 1e3
    levels = {t: sorted({c.maxima[t] for c in cols
                         if c.maxima.get(t, 0) * (slots if t == "slot" else 1) >= MIN_LEVEL_SHARE * room})
              for t in MAX_TERMS}
    nx = len(cols)
    z = {(t, v): nx + i for i, (t, v) in enumerate((t, v) for t in MAX_TERMS for v in levels[t])}
    t_col = nx + len(z)
    rows = LpRows(t_col + 1 + len(ahead_ms))  # then one T_p per frame phase
    # units: T in the compute floor, memory in the room, so that HiGHS's tolerances sit far below either
    t_unit, m_unit = resident_ms or 1.0, float(max(room, 1))
    rows.add({**{j: (c.compute_ms + a_k * c.copy_ms) / t_unit for j, c in enumerate(cols)}, t_col: -1.0}, -np.inf, 0.0)
    rows.add({**{j: (c.copy_ms + a_c * c.compute_ms) / t_unit for j, c in enumerate(cols)}, t_col: -1.0}, -np.inf, 0.0)
    _phase_rows(rows, cols, ahead_ms, a_k, a_c, t_col, t_unit)
    by_block: list[dict[int, float]] = [{} for _ in own]  # grouped once: a scan of every column per block was
    for j, c in enumerate(cols):                             # quadratic (7 s of a 4096-layer model's plan)
        by_block[c.block][j] = 1.0
    for one_of in by_block:
        rows.add(one_of, 1.0, 1.0)
    charged = _level_rows(rows, cols, levels, z, slots, m_unit)
    frame = {j: c.frame_bytes / m_unit for j, c in enumerate(cols) if c.frame_bytes}
    rows.add({**frame, **charged}, -np.inf, 1.0)
    for p in range(n_phases):
        phase = {j: c.phase_bytes / m_unit for j, c in enumerate(cols) if c.phase == p and c.phase_bytes}
        rows.add({**frame, **phase, **charged}, -np.inf, 1.0)
    objective, integrality, upper = np.zeros(rows.nv), np.zeros(rows.nv), np.full(rows.nv, np.inf)
    objective[t_col], integrality[nx:t_col], upper[:t_col] = 1.0, 1, 1.0
    res = milp(objective, constraints=rows.constraint(),
               integrality=integrality, bounds=Bounds(np.zeros(rows.nv), upper), options=dict(HIGHS_OPTIONS))
    if res.x is None:  # the solver found no point, though the plan's own is one: trust the plan
        return own_ms / 1e3
    # the solver's proven bound, not its incumbent (a lower bound whatever gap it stopped at), and never above the
    # plan's own placement, a feasible point: a guard against a solver's wrong optimum
    dual = getattr(res, "mip_dual_bound", None)
    value = min(res.fun, dual) if dual is not None and np.isfinite(dual) else res.fun
    return min(max(value, 0.0) * t_unit, own_ms) / 1e3
