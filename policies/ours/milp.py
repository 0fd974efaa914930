"""The exact part of our planner: a mixed-integer program over how many blocks of a class take each option.

Time is linearised as T ≥ K + a_k·C and T ≥ C + a_c·K (compute K, copy C, the device's interference a_k, a_c) — the
simulator's interference model for fully pipelined copies; slots, scratch, staging and each dequantizing thread's
unpack staging enter as maxima, so the memory is the simulator's (residency.simulate.memory.peak_bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from policies.ours.options import BlockClass

TIME_SCALE = 1e3  # solve in ms: keeps coefficients near 1 for HiGHS
MEM_SCALE = 1.0 / 2**30  # and memory in GiB


@dataclass(frozen=True)
class Problem:
    """One MILP: the block classes and their options, the budgets (bytes, seconds) and what to minimise."""

    classes: list[BlockClass]
    slots: int  # prefetch depth + 1
    # (a_k, a_c) of T ≥ K + a_k·C and T ≥ C + a_c·K: the profile's per-engine interference
    # (residency.simulate.bounds.interference_coefficients; (1 − o, 1 − o) for an overlap-only profile)
    interference: tuple[float, float]
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
    """The solver's answer: block counts per class and option, and the linearised time, loss and memory."""

    counts: list[list[int]]  # per class, per option: how many blocks take it
    frame_s: float  # the linearised T
    loss: float
    device_bytes: int  # linearised peak over the frame and session phases


@dataclass(frozen=True)
class _Layout:
    """Column indices: n[c,o] (integer) at k, y[c,o] (binary: option used) at y0 + k, then the seven scalars."""

    index: list[tuple[int, int]]  # k -> (class, option)
    nv: int  # number of variables
    y0: int
    t_i: int  # T, the linearised frame time (ms)
    slot_i: int  # M_slot (GiB), the largest ring slot
    scr_i: int  # M_scratch (GiB)
    stage_i: int  # M_stage (GiB)
    unpack_compute_i: int  # M_unpack (GiB): the compute side's unpack staging
    unpack_copy_i: int  # M_unpack (GiB): the copy side's unpack staging
    peak_i: int  # M_peak (GiB), the worse of the frame and session phases


@dataclass
class _Terms:
    """Per n[c,o] column k: its coefficient in each linear term (time in ms, memory in GiB)."""

    compute: dict[int, float] = field(default_factory=dict)
    copy: dict[int, float] = field(default_factory=dict)
    loss: dict[int, float] = field(default_factory=dict)
    frame_mem: dict[int, float] = field(default_factory=dict)
    session_mem: dict[int, float] = field(default_factory=dict)


class _Rows:
    """The constraint matrix, one row at a time: lb ≤ row · x ≤ ub."""

    def __init__(self, nv: int) -> None:
        self.nv = nv
        self.rows: list[np.ndarray] = []
        self.lbs: list[float] = []
        self.ubs: list[float] = []

    def add(self, coeffs: dict[int, float], lb: float, ub: float) -> None:
        """Appends a row; coeffs maps column index to coefficient (repeated columns would add up)."""
        row = np.zeros(self.nv)
        for i, v in coeffs.items():
            row[i] += v
        self.rows.append(row)
        self.lbs.append(lb)
        self.ubs.append(ub)

    def constraint(self) -> LinearConstraint:
        """The rows added so far as one scipy constraint."""
        return LinearConstraint(np.array(self.rows), self.lbs, self.ubs)


def _layout(p: Problem) -> _Layout:
    index = [(ci, oi) for ci, c in enumerate(p.classes) for oi in range(len(c.options))]
    nv = 2 * len(index) + 7
    return _Layout(index, nv, len(index), nv - 7, nv - 6, nv - 5, nv - 4, nv - 3, nv - 2, nv - 1)


def _bounds(p: Problem, lay: _Layout) -> tuple[Bounds, np.ndarray]:
    """Variable bounds (n ≤ the class's block count, y ≤ 1, the rest ≥ 0) and the integrality vector."""
    lo, hi = np.zeros(lay.nv), np.full(lay.nv, np.inf)
    integrality = np.zeros(lay.nv)
    integrality[: 2 * len(lay.index)] = 1
    for k, (ci, _) in enumerate(lay.index):
        hi[k] = len(p.classes[ci].blocks)
        hi[lay.y0 + k] = 1
    return Bounds(lo, hi), integrality


def _option_rows(p: Problem, lay: _Layout, rows: _Rows) -> _Terms:
    """Adds the per-class and per-option rows; returns each option column's time, loss and memory terms."""
    for ci, c in enumerate(p.classes):  # every block of a class takes exactly one option
        rows.add({k: 1.0 for k, (cj, _) in enumerate(lay.index) if cj == ci}, len(c.blocks), len(c.blocks))
    terms = _Terms()
    for k, (ci, oi) in enumerate(lay.index):
        c, o = p.classes[ci], p.classes[ci].options[oi]
        rows.add({k: 1.0, lay.y0 + k: -float(len(c.blocks))}, -np.inf, 0.0)  # n > 0 only if y = 1
        if o.slot_bytes:
            rows.add({lay.slot_i: 1.0, lay.y0 + k: -o.slot_bytes * MEM_SCALE}, 0.0, np.inf)
        if o.scratch_bytes:
            rows.add({lay.scr_i: 1.0, lay.y0 + k: -o.scratch_bytes * MEM_SCALE}, 0.0, np.inf)
        if o.staging_bytes:
            rows.add({lay.stage_i: 1.0, lay.y0 + k: -o.staging_bytes * MEM_SCALE}, 0.0, np.inf)
        if o.compute_unpack_bytes:
            rows.add({lay.unpack_compute_i: 1.0, lay.y0 + k: -o.compute_unpack_bytes * MEM_SCALE}, 0.0, np.inf)
        if o.copy_unpack_bytes:
            rows.add({lay.unpack_copy_i: 1.0, lay.y0 + k: -o.copy_unpack_bytes * MEM_SCALE}, 0.0, np.inf)
        terms.compute[k] = o.compute_s * TIME_SCALE
        terms.copy[k] = o.copy_s * TIME_SCALE
        terms.loss[k] = o.loss
        mem = o.device_bytes * MEM_SCALE
        (terms.frame_mem if c.calls_per_frame else terms.session_mem)[k] = mem
    return terms


def _time_and_peak_rows(p: Problem, lay: _Layout, rows: _Rows, terms: _Terms) -> None:
    """Adds T ≥ each linearised frame time and M_peak ≥ each phase's memory."""
    compute, copy = terms.compute, terms.copy
    a_k, a_c = p.interference
    rows.add({**{k: compute[k] + a_k * copy[k] for k in compute}, lay.t_i: -1.0}, -np.inf, 0.0)
    rows.add({**{k: copy[k] + a_c * compute[k] for k in compute}, lay.t_i: -1.0}, -np.inf, 0.0)
    memory_terms = {**terms.frame_mem, lay.slot_i: float(p.slots), lay.scr_i: 1.0, lay.stage_i: 1.0,
                    lay.unpack_compute_i: 1.0, lay.unpack_copy_i: 1.0}
    peak_frame = dict(memory_terms)
    peak_session = {**memory_terms, **terms.session_mem}
    rows.add({**peak_frame, lay.peak_i: -1.0}, -np.inf, 0.0)  # M_peak: the worse of the frame and session phases
    rows.add({**peak_session, lay.peak_i: -1.0}, -np.inf, 0.0)


def _budget_rows(p: Problem, lay: _Layout, rows: _Rows, terms: _Terms) -> None:
    """Adds the VRAM, frame-time, time-cap and loss-cap limits the problem sets."""
    if p.vram_bytes is not None:
        rows.add({lay.peak_i: 1.0}, -np.inf, p.vram_bytes * MEM_SCALE - p.fixed_bytes * MEM_SCALE)
    if p.frame_s is not None:
        rows.add({lay.t_i: 1.0}, -np.inf, p.frame_s * TIME_SCALE)
    if p.time_cap_s is not None:
        rows.add({lay.t_i: 1.0}, -np.inf, p.time_cap_s * TIME_SCALE)
    if p.loss_cap is not None:
        rows.add(dict(terms.loss), -np.inf, p.loss_cap + 1e-12)


def _objective(p: Problem, lay: _Layout, loss: dict[int, float]) -> np.ndarray:
    """The cost vector; each objective breaks ties by a 1e-6 weight on the next criterion."""
    c_obj = np.zeros(lay.nv)
    if p.objective == "loss":
        for k, v in loss.items():
            c_obj[k] = v
        c_obj[lay.t_i] = 1e-6  # among equal quality, the faster
    elif p.objective == "time":
        c_obj[lay.t_i] = 1.0
        for k, v in loss.items():
            c_obj[k] = 1e-6 * v
    else:  # memory: the least VRAM that holds the other constraints
        c_obj[lay.peak_i] = 1.0
        c_obj[lay.t_i] = 1e-6
    return c_obj


def _solution(p: Problem, lay: _Layout, x: np.ndarray, loss: dict[int, float]) -> Solution:
    counts = [[0] * len(c.options) for c in p.classes]
    for k, (ci, oi) in enumerate(lay.index):
        counts[ci][oi] = int(round(x[k]))
    fixed = p.fixed_bytes * MEM_SCALE
    return Solution(counts, x[lay.t_i] / TIME_SCALE, float(sum(loss[k] * x[k] for k in loss)),
                    int((x[lay.peak_i] + fixed) / MEM_SCALE))


def solve(p: Problem) -> Solution | None:
    """Solves `p` with HiGHS (relative gap 2e-3, capped at p.node_limit nodes: deterministic under any load).

    Returns the block counts per class and option with the linearised frame time (s), loss and peak device
    bytes, or None when no assignment holds the constraints (or none was found within the node limit).
    """
    lay = _layout(p)
    bounds, integrality = _bounds(p, lay)
    rows = _Rows(lay.nv)
    terms = _option_rows(p, lay, rows)
    _time_and_peak_rows(p, lay, rows, terms)
    _budget_rows(p, lay, rows, terms)
    options = {"mip_rel_gap": 2e-3}
    if p.node_limit is not None:
        options["node_limit"] = p.node_limit
    result = milp(_objective(p, lay, terms.loss), constraints=rows.constraint(), integrality=integrality,
                  bounds=bounds, options=options)
    if result.x is None:
        return None
    return _solution(p, lay, result.x, terms.loss)
