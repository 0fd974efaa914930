"""The exact part of our planner: a mixed-integer program over how many blocks of a class take each option.

Time is linearised as T ≥ K + (1−o)·C and T ≥ C + (1−o)·K (compute K, copy C, overlap o) — the
simulator's interference model for fully pipelined copies; slots and scratch enter as maxima.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from policies.ours.options import BlockClass

TIME_SCALE = 1e3  # solve in ms: keeps coefficients near 1 for HiGHS
MEM_SCALE = 1.0 / 2**30  # and memory in GiB


@dataclass(frozen=True)
class Problem:
    classes: list[BlockClass]
    slots: int  # prefetch depth + 1
    overlap: float  # profile copy/compute overlap, 0..1
    fixed_bytes: int  # KV cache, activations, workspace: memory no option changes
    vram_bytes: int | None  # None: unconstrained (to find the memory a time budget needs)
    frame_s: float | None  # None: unconstrained
    objective: str  # "loss" | "time" | "memory"
    loss_cap: float | None = None  # with objective "time"/"memory": keep quality at least this good
    time_cap_s: float | None = None  # with objective "loss"/"memory": stay at least this fast
    # HiGHS branch-and-bound nodes per solve (None: solve to the gap). A count of work, not wall time, so
    # the same problem gets the same answer under any machine load.
    node_limit: int | None = None


@dataclass(frozen=True)
class Solution:
    counts: list[list[int]]  # per class, per option: how many blocks take it
    frame_s: float  # the linearised T
    loss: float
    device_bytes: int  # linearised peak over the frame and session phases


def solve(p: Problem) -> Solution | None:
    # Variable layout: n[c,o] (integer), y[c,o] (binary: option used), T, M_slot, M_scratch, M_stage, M_peak.
    index = [(ci, oi) for ci, c in enumerate(p.classes) for oi in range(len(c.options))]
    nv = 2 * len(index) + 5
    t_i, slot_i, scr_i, stage_i, peak_i = nv - 5, nv - 4, nv - 3, nv - 2, nv - 1
    y0 = len(index)
    lo, hi = np.zeros(nv), np.full(nv, np.inf)
    integrality = np.zeros(nv)
    integrality[: 2 * len(index)] = 1
    for k, (ci, _) in enumerate(index):
        hi[k] = len(p.classes[ci].blocks)
        hi[y0 + k] = 1
    rows, lbs, ubs = [], [], []

    def add(coeffs: dict[int, float], lb: float, ub: float) -> None:
        row = np.zeros(nv)
        for i, v in coeffs.items():
            row[i] += v
        rows.append(row)
        lbs.append(lb)
        ubs.append(ub)

    for ci, c in enumerate(p.classes):  # every block of a class takes exactly one option
        add({k: 1.0 for k, (cj, _) in enumerate(index) if cj == ci}, len(c.blocks), len(c.blocks))
    compute, copy, loss, frame_mem, session_mem = {}, {}, {}, {}, {}
    for k, (ci, oi) in enumerate(index):
        c, o = p.classes[ci], p.classes[ci].options[oi]
        add({k: 1.0, y0 + k: -float(len(c.blocks))}, -np.inf, 0.0)  # n > 0 only if y = 1
        if o.slot_bytes:
            add({slot_i: 1.0, y0 + k: -o.slot_bytes * MEM_SCALE}, 0.0, np.inf)
        if o.scratch_bytes:
            add({scr_i: 1.0, y0 + k: -o.scratch_bytes * MEM_SCALE}, 0.0, np.inf)
        if o.staging_bytes:
            add({stage_i: 1.0, y0 + k: -o.staging_bytes * MEM_SCALE}, 0.0, np.inf)
        compute[k] = o.compute_s * TIME_SCALE
        copy[k] = o.copy_s * TIME_SCALE
        loss[k] = o.loss
        mem = o.device_bytes * MEM_SCALE
        (frame_mem if c.calls_per_frame else session_mem)[k] = mem
    shared = 1.0 - p.overlap
    add({**{k: compute[k] + shared * copy[k] for k in compute}, t_i: -1.0}, -np.inf, 0.0)
    add({**{k: copy[k] + shared * compute[k] for k in compute}, t_i: -1.0}, -np.inf, 0.0)
    memory_terms = {**frame_mem, slot_i: float(p.slots), scr_i: 1.0, stage_i: 1.0}
    peak_frame = dict(memory_terms)
    peak_session = {**memory_terms, **session_mem}
    fixed = p.fixed_bytes * MEM_SCALE
    add({**peak_frame, peak_i: -1.0}, -np.inf, 0.0)  # M_peak: the worse of the frame and session phases
    add({**peak_session, peak_i: -1.0}, -np.inf, 0.0)
    if p.vram_bytes is not None:
        add({peak_i: 1.0}, -np.inf, p.vram_bytes * MEM_SCALE - fixed)
    if p.frame_s is not None:
        add({t_i: 1.0}, -np.inf, p.frame_s * TIME_SCALE)
    if p.time_cap_s is not None:
        add({t_i: 1.0}, -np.inf, p.time_cap_s * TIME_SCALE)
    if p.loss_cap is not None:
        add(dict(loss), -np.inf, p.loss_cap + 1e-12)

    c_obj = np.zeros(nv)
    if p.objective == "loss":
        for k, v in loss.items():
            c_obj[k] = v
        c_obj[t_i] = 1e-6  # among equal quality, the faster
    elif p.objective == "time":
        c_obj[t_i] = 1.0
        for k, v in loss.items():
            c_obj[k] = 1e-6 * v
    else:  # memory: the least VRAM that holds the other constraints
        c_obj[peak_i] = 1.0
        c_obj[t_i] = 1e-6
    options = {"mip_rel_gap": 2e-3}
    if p.node_limit is not None:
        options["node_limit"] = p.node_limit
    result = milp(c_obj, constraints=LinearConstraint(np.array(rows), lbs, ubs), integrality=integrality,
                  bounds=Bounds(lo, hi), options=options)
    if result.x is None:
        return None
    x = result.x
    counts = [[0] * len(c.options) for c in p.classes]
    for k, (ci, oi) in enumerate(index):
        counts[ci][oi] = int(round(x[k]))
    return Solution(counts, x[t_i] / TIME_SCALE, float(sum(loss[k] * x[k] for k in loss)),
                    int((x[peak_i] + fixed) / MEM_SCALE))
