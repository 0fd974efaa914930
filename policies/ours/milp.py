"""The exact part of our planner: a mixed-integer program over how many blocks of a class take each option.

Time is linearised as T ≥ K + a_k·C and T ≥ C + a_c·K (compute K, copy C, the device's interference a_k, a_c) — the
simulator's interference model for fully pipelined copies; slots, scratch, staging and each dequantizing thread's
unpack staging enter as maxima, so the memory is the simulator's (residency.simulate.memory.peak_bytes).

What keeps a solve small (on the tiny Flux pipeline of the tests a plan's solves took 50-500 HiGHS nodes in all,
0.5-5 s under load; now 2-33 nodes): an option another of its class matches or beats on every term is dropped
(exact: swapping one in never worsens a solution); a class of one block needs no "option used" binary (its
count is one); each maximum is also bounded below by its class's mean (valid, and the LP relaxation's
half-streamed blocks then pay for their slot); time and memory are solved in units of the problem's own size,
not ms and GiB, which had put a 1 MB model's coefficients at 1e-9, HiGHS's tolerances.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, milp

from policies.ours.options import BlockClass, Option
from policies.ours.quiet_fd import solver_quiet
from residency.simulate.lp_rows import LpRows

# HiGHS's improvement heuristics cost more than they find on these ~100-column problems; without them the solves
# can afford a 50x tighter gap. Measured on the 13 solves of lucid-800m on the RTX 3060 at 10% (2 cores): 2.45 s
# with them at a 2e-3 gap, 0.98 s without them at 1e-4, every objective as good or better. At 2e-3 a solution
# 0.05% worse in the linear time came out 1.6% slower in the simulator: which such solution the heuristics hit
# decided the plan. Passed to HiGHS verbatim through scipy's milp (it warns that it does); a scipy whose HiGHS
# binding lacks one solves with its defaults (_solve_milp).
MIP_REL_GAP = 1e-4
HEURISTICS_OFF = {"mip_heuristic_run_feasibility_jump": False, "mip_heuristic_run_rens": False,
                  "mip_heuristic_run_rins": False}

# The maxima of the memory: each the largest of its term over the options used
MAX_TERMS = ("slot_bytes", "scratch_bytes", "staging_bytes", "compute_unpack_bytes", "copy_unpack_bytes")


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


def _terms(o: Option) -> tuple:
    """What an option costs a solution, each term the less the better (loss, time, bytes)."""
    return (o.loss, o.compute_s, o.copy_s, o.device_bytes, *(getattr(o, t) for t in MAX_TERMS))


def kept_options(c: BlockClass) -> list[int]:
    """Indices of the class's options that no other one matches or beats on every term (of equal ones, the first).

    Exact for every objective and limit: each term enters the MILP with a non-negative weight or as a maximum, so
    swapping a dropped option for the one that dominates it never worsens a solution. Cost: options² per class.
    """
    terms = [_terms(o) for o in c.options]
    kept = []
    for i, t in enumerate(terms):
        if not any(j != i and all(a <= b for a, b in zip(u, t, strict=True)) and (u != t or j < i)
                   for j, u in enumerate(terms)):
            kept.append(i)
    return kept


@dataclass(frozen=True)
class _Layout:
    """Column indices: n[c,o] (integer) at k; y[c,o] (binary: option used) where its option has a maximum term and
    its class more than one block (a one-block class's n is its own indicator); then the seven scalars."""

    index: list[tuple[int, int]]  # k -> (class, option index in the class's options)
    used: list[int]  # k -> the column that is 1 when option k is used: its y, or n itself
    nv: int  # number of variables
    n_int: int  # the first n_int columns are integer
    t_i: int  # T, the linearised frame time (in time units)
    slot_i: int  # M_slot, the largest ring slot (in memory units)
    scr_i: int  # M_scratch
    stage_i: int  # M_stage
    unpack_compute_i: int  # M_unpack: the compute side's unpack staging
    unpack_copy_i: int  # M_unpack: the copy side's unpack staging
    peak_i: int  # M_peak, the worse of the frame and session phases
    time_unit_s: float  # seconds per unit of T
    mem_unit_bytes: float  # bytes per unit of memory

    def max_columns(self) -> dict[str, int]:
        return dict(zip(MAX_TERMS, (self.slot_i, self.scr_i, self.stage_i, self.unpack_compute_i,
                                    self.unpack_copy_i), strict=True))


def _layout(p: Problem) -> _Layout:
    index = [(ci, oi) for ci, c in enumerate(p.classes) for oi in kept_options(c)]
    used, ny = [], 0
    for k, (ci, oi) in enumerate(index):
        o = p.classes[ci].options[oi]
        if len(p.classes[ci].blocks) > 1 and any(getattr(o, t) for t in MAX_TERMS):
            used.append(len(index) + ny)
            ny += 1
        else:
            used.append(k)
    n_int = len(index) + ny
    nv = n_int + 7
    # T ≥ the compute of every block at its fastest option: in that unit T ≥ 1, so HiGHS's absolute gap (1e-6)
    # stays far below the relative one; memory in the bytes of every block at its largest option
    time_s = sum(len(c.blocks) * min(o.compute_s for o in c.options) for c in p.classes)
    mem = sum(len(c.blocks) * max(max(o.device_bytes, o.slot_bytes) for o in c.options) for c in p.classes)
    return _Layout(index, used, nv, n_int, *range(n_int, nv), time_unit_s=time_s or 1e-3,
                   mem_unit_bytes=float(mem + p.fixed_bytes) or 1.0)


@dataclass
class _Terms:
    """Per n[c,o] column k: its coefficient in each linear term (time and memory in the layout's units)."""

    compute: dict[int, float] = field(default_factory=dict)
    copy: dict[int, float] = field(default_factory=dict)
    loss: dict[int, float] = field(default_factory=dict)
    frame_mem: dict[int, float] = field(default_factory=dict)
    session_mem: dict[int, float] = field(default_factory=dict)


def _bounds(p: Problem, lay: _Layout) -> tuple[Bounds, np.ndarray]:
    """Variable bounds (n ≤ the class's block count, y ≤ 1, the rest ≥ 0) and the integrality vector."""
    lo, hi = np.zeros(lay.nv), np.full(lay.nv, np.inf)
    integrality = np.zeros(lay.nv)
    integrality[: lay.n_int] = 1
    for k, (ci, _) in enumerate(lay.index):
        hi[k] = len(p.classes[ci].blocks)
        hi[lay.used[k]] = min(hi[lay.used[k]], hi[k])  # y ≤ 1; a one-block class's n ≤ 1
    for k in range(len(lay.index), lay.n_int):
        hi[k] = 1
    return Bounds(lo, hi), integrality


def _option_rows(p: Problem, lay: _Layout, rows: LpRows) -> _Terms:
    """Adds the per-class and per-option rows; returns each option column's time, loss and memory terms."""
    t, m = 1.0 / lay.time_unit_s, 1.0 / lay.mem_unit_bytes
    maxima = lay.max_columns()
    for ci, c in enumerate(p.classes):  # every block of a class takes exactly one option
        ks = [k for k, (cj, _) in enumerate(lay.index) if cj == ci]
        rows.add({k: 1.0 for k in ks}, len(c.blocks), len(c.blocks))
        # each maximum ≥ the class's mean (valid: a mean is at most a maximum). For a one-block class it is the
        # maximum's only row (its options' rows summed: tighter in the LP, where one block may be half streamed);
        # a larger class keeps a row per option on its y, and gets this one where two options have the term.
        for term, col in maxima.items():
            mean = {k: getattr(c.options[lay.index[k][1]], term) * m / len(c.blocks) for k in ks}
            mean = {k: v for k, v in mean.items() if v}
            if mean and (len(c.blocks) == 1 or len(mean) > 1):
                rows.add({col: 1.0, **{k: -v for k, v in mean.items()}}, 0.0, np.inf)
    terms = _Terms()
    for k, (ci, oi) in enumerate(lay.index):
        c, o = p.classes[ci], p.classes[ci].options[oi]
        y = lay.used[k]
        if y != k:  # a class of several blocks: n > 0 only if y = 1, and each maximum ≥ the option's term if used
            rows.add({k: 1.0, y: -float(len(c.blocks))}, -np.inf, 0.0)
            for term, col in maxima.items():
                if getattr(o, term):
                    rows.add({col: 1.0, y: -getattr(o, term) * m}, 0.0, np.inf)
        terms.compute[k] = o.compute_s * t
        terms.copy[k] = o.copy_s * t
        terms.loss[k] = o.loss
        (terms.frame_mem if c.calls_per_frame else terms.session_mem)[k] = o.device_bytes * m
    return terms


def _time_and_peak_rows(p: Problem, lay: _Layout, rows: LpRows, terms: _Terms) -> None:
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


def _budget_rows(p: Problem, lay: _Layout, rows: LpRows, terms: _Terms) -> None:
    """Adds the VRAM, frame-time, time-cap and loss-cap limits the problem sets."""
    if p.vram_bytes is not None:
        rows.add({lay.peak_i: 1.0}, -np.inf, (p.vram_bytes - p.fixed_bytes) / lay.mem_unit_bytes)
    if p.frame_s is not None:
        rows.add({lay.t_i: 1.0}, -np.inf, p.frame_s / lay.time_unit_s)
    if p.time_cap_s is not None:
        rows.add({lay.t_i: 1.0}, -np.inf, p.time_cap_s / lay.time_unit_s)
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
    return Solution(counts, x[lay.t_i] * lay.time_unit_s, float(sum(loss[k] * x[k] for k in loss)),
                    int(x[lay.peak_i] * lay.mem_unit_bytes) + p.fixed_bytes)


def solve(p: Problem) -> Solution | None:
    """Solves `p` with HiGHS (relative gap MIP_REL_GAP, capped at p.node_limit nodes: deterministic under any load).

    Returns the block counts per class and option with the linearised frame time (s), loss and peak device
    bytes, or None when no assignment holds the constraints (or none was found within the node limit).
    """
    lay = _layout(p)
    bounds, integrality = _bounds(p, lay)
    rows = LpRows(lay.nv)
    terms = _option_rows(p, lay, rows)
    _time_and_peak_rows(p, lay, rows, terms)
    _budget_rows(p, lay, rows, terms)
    options = {"mip_rel_gap": MIP_REL_GAP}
    if p.node_limit is not None:
        options["node_limit"] = p.node_limit
    result = _solve_milp(_objective(p, lay, terms.loss), rows.constraint(), integrality, bounds, options)
    if result.x is None:
        return None
    return _solution(p, lay, result.x, terms.loss)


def _solve_milp(c: np.ndarray, constraints, integrality: np.ndarray, bounds: Bounds, options: dict):
    """scipy's milp with HEURISTICS_OFF, or with `options` alone where this scipy's HiGHS binding lacks one of
    them (it raises AttributeError setting it; an option this HiGHS does not know at all is skipped, warned)."""
    with solver_quiet():  # HiGHS's debug printf, scipy's "Unrecognized options" (policies.ours.quiet_fd)
        try:
            return milp(c, constraints=constraints, integrality=integrality, bounds=bounds,
                        options={**options, **HEURISTICS_OFF})
        except AttributeError:
            return milp(c, constraints=constraints, integrality=integrality, bounds=bounds, options=options)
