"""The physical floor of a steady latent frame: a linear relaxation over where each block could live.

At the plan's storage formats, each block may be resident (dequantized), resident packed (dequantized
per call) or streamed (copied per call at peak link rate), in any fraction; no real plan beats that.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog

from residency.device.profile import DeviceProfile
from residency.formats.dtypes import DTYPE_FORMAT
from residency.plan.plan import Plan
from residency.simulate.costs import compute_s, dequant_s
from residency.simulate.memory import GPU_WORKSPACE_BYTES
from residency.workload.spec import Workload


def compute_floor_s(workload: Workload, plan: Plan, profile: DeviceProfile, block: str | None = None) -> float:
    """Calls of a frame (of one block, or all) as if resident at the plan's compute dtype."""
    total = 0.0
    for ph in workload.frame_phases():
        for p in ph.passes:
            kv_read = p.kv != "none"
            for name in p.blocks:
                if block is None or name == block:
                    total += workload.count(p) * compute_s(workload.by_name[name], plan.by_name[name], profile,
                                                           workload.context_frames, kv_read, plan.kv_dtype,
                                                           workload.batch)
    return total


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


def lower_bound_s(workload: Workload, plan: Plan, profile: DeviceProfile) -> float:
    """Seconds: min T over fractional placements with T ≥ K + a_k·C and T ≥ C + a_c·K (compute K, copy C;
    a_k, a_c from interference_coefficients) and the VRAM budget — even a perfect pipeline pays the
    interference the device measured. No plan's simulated steady frame is shorter."""
    frame_blocks = list(dict.fromkeys(b for ph in workload.frame_phases() for b in ph.blocks))
    fixed = workload.kv_cache_bytes(plan.kv_dtype) + max(
        (workload.by_name[b].activation_bytes(plan.by_name[b].compute_dtype, workload.batch) for b in frame_blocks),
        default=0) + (GPU_WORKSPACE_BYTES if profile.is_gpu else 0)
    room = plan.budget.vram_bytes - fixed
    link = max(profile.link["h2d_pinned"].y) * 1e9
    a_k, a_c = interference_coefficients(profile)
    # variables: per block fractions resident, packed, streamed (dequant on compute), streamed (dequant
    # on the copy engine); then T in ms
    n, m = len(frame_blocks), 4
    cost_k, cost_c, mem = np.zeros(m * n), np.zeros(m * n), np.zeros(m * n)
    for i, name in enumerate(frame_blocks):
        block, bp = workload.by_name[name], plan.by_name[name]
        calls = workload.calls_per_frame(name)
        k = compute_floor_s(workload, plan, profile, name) * 1e3
        d = calls * dequant_s(block, bp.format, bp.compute_dtype, profile) * 1e3
        move = calls * block.nbytes(bp.format) / link * 1e3
        cost_k[m * i: m * i + m] = (k, k + d, k + d, k)
        cost_c[m * i + 2: m * i + m] = (move, move + d)
        mem[m * i: m * i + 2] = (block.nbytes(DTYPE_FORMAT[bp.compute_dtype]) / 2**30, block.nbytes(bp.format) / 2**30)
    c_obj = np.zeros(m * n + 1)
    c_obj[-1] = 1.0
    a_ub = np.array([np.append(cost_k + a_k * cost_c, -1.0), np.append(cost_c + a_c * cost_k, -1.0),
                     np.append(mem, 0.0)])
    b_ub = np.array([0.0, 0.0, max(room, 0) / 2**30])
    a_eq = np.zeros((n, m * n + 1))
    for i in range(n):
        a_eq[i, m * i: m * i + m] = 1.0
    res = linprog(c_obj, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=np.ones(n), bounds=(0, None), method="highs")
    if res.status != 0:  # nothing fits (room < 0): everything streams
        k, c = cost_k[2::m].sum(), cost_c[2::m].sum()
        return max(k + a_k * c, c + a_c * k) / 1e3
    return res.fun / 1e3
