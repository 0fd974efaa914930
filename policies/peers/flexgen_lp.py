"""Peer `flexgen-lp`: FlexGen's placement LP: one resident/streamed percentage per kind of layer,
minimising time with per-layer time = max(copy in, compute) under the memory budget.

FlexGen's 4-bit group-wise compression of weights exists but is off by default; it is off here too, so
weights are stored at the compute dtype's format. KV and activations stay on the device (our contract).

Execution mode: eager under every request: FlexGen's runtime (flex_opt.py) runs each layer's PyTorch ops as
written, one layer at a time between its own stream synchronisations; it has no compiled or graph-captured path.

Sources:
- https://arxiv.org/abs/2303.06865 (the FlexGen paper: its cost model and the linear program of the policy
  search)
- https://github.com/FMInference/FlexLLMGen/blob/main/flexllmgen/flex_opt.py (`Policy` percentages; the next
  layer's weights loaded on their own stream while the current layer computes, synchronised per layer)
- https://github.com/FMInference/FlexLLMGen/blob/main/flexllmgen/compression.py (group-wise quantization,
  used only when the policy asks for it)
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog

from policies.base import PlanRequest, build_plan, weights_format
from policies.peers._common import inference_bytes, kv_dtype, split_blocks, workspace_bytes
from residency.plan import BlockPlan, Execution, Plan
from residency.simulate.costs import call_cost, copy_s
from residency.units import fmt_bytes

NAME = "flexgen-lp"
# Weights of layer j+1 load on their own stream while layer j computes, synchronised per layer
# (async, depth 1), from pinned buffers; one transfer per block (FlexGen moves a layer's weights whole).
EXECUTION = Execution(copy_mode="async", prefetch_depth=1, pinned=True)
# Among plans of equal LP time, prefer fewer link bytes per frame, then fewer at session start: the LP's
# optimum is flat wherever the copies hide under compute, and less traffic disturbs compute less.
TIE_FRAME_BYTES = 1e-3
TIE_SESSION = 1e-6


def solve_fractions(req: PlanRequest) -> dict[str, float] | None:
    """Streamed fraction of each component's weights; {} when everything fits, None when nothing does."""
    w, profile = req.workload, req.profile
    fmt = weights_format(req.compute_dtype)
    comps = w.components
    comp_bytes = {c: sum(b.nbytes(fmt) for b in w.blocks if b.component == c) for c in comps}
    fixed = inference_bytes(req) + workspace_bytes(req)
    if sum(comp_bytes.values()) + fixed <= req.budget.vram_bytes:
        return {}
    # Streaming needs `slots` buffers; reserve them for the largest block, whichever ends up streamed.
    slots = EXECUTION.slots * max(b.nbytes(fmt) for b in w.blocks)
    weight_room = req.budget.vram_bytes - fixed - slots

    copy_in = {b.name: copy_s(b, fmt, profile, EXECUTION) for b in w.blocks}
    # One LP "layer" per (block, KV access) in the steady frame, with its runs per frame.
    runs: dict[tuple[str, bool], int] = {}
    for ph in w.frame_phases():
        for p in ph.passes:
            for name in p.blocks:
                key = (name, p.kv != "none")
                runs[key] = runs.get(key, 0) + w.count(p)
    session_copy = {c: 0.0 for c in comps}
    for ph in w.session_phases():
        for p in ph.passes:
            for name in p.blocks:
                session_copy[w.by_name[name].component] += w.count(p) * copy_in[name]

    nc, layers = len(comps), list(runs)
    ci = {c: i for i, c in enumerate(comps)}
    cost = np.zeros(nc + len(layers))
    lower = np.zeros(nc + len(layers))
    rows, rhs = [], []
    for j, (name, kv_read) in enumerate(layers):
        block = w.by_name[name]
        resident = BlockPlan(name, "resident", fmt, req.compute_dtype)
        compute = call_cost(block, resident, profile, EXECUTION, w.context_frames, kv_read, kv_dtype(req),
                            w.batch).compute_s
        k, c = runs[(name, kv_read)], ci[block.component]
        cost[nc + j] = k  # Σ runs × max(x_c · copy in, compute)
        lower[nc + j] = compute
        cost[c] += TIE_FRAME_BYTES * k * copy_in[name]
        row = np.zeros(nc + len(layers))
        row[c], row[nc + j] = copy_in[name], -1.0  # x_c · copy in ≤ t_j
        rows.append(row)
        rhs.append(0.0)
    for c in comps:
        cost[ci[c]] += TIE_SESSION * session_copy[c]
    mem = np.zeros(nc + len(layers))  # Σ (1 − x_c) · W_c ≤ weight room
    for c in comps:
        mem[ci[c]] = -comp_bytes[c]
    rows.append(mem)
    rhs.append(weight_room - sum(comp_bytes.values()))
    bounds = [(0.0, 1.0)] * nc + [(lo, None) for lo in lower[nc:]]
    res = linprog(cost, A_ub=np.array(rows), b_ub=np.array(rhs), bounds=bounds, method="highs")
    if res.status != 0:
        return None
    return {c: float(min(1.0, max(0.0, res.x[ci[c]]))) for c in comps}


def streamed_blocks(req: PlanRequest, fractions: dict[str, float]) -> set[str]:
    """Whole blocks from fractions: each component streams its first blocks (run order) until their bytes
    reach fraction × its bytes — ⌈fraction·n⌉ blocks when its blocks are equal, never fewer bytes."""
    w = req.workload
    fmt = weights_format(req.compute_dtype)
    out: set[str] = set()
    for c, x in fractions.items():
        members = [b for b in w.blocks if b.component == c]
        target = x * sum(b.nbytes(fmt) for b in members) * (1 - 1e-9)
        got = 0
        for b in members:
            if got >= target or x <= 1e-9:
                break
            out.add(b.name)
            got += b.nbytes(fmt)
    return out


def plan(req: PlanRequest) -> Plan:
    """FlexGen's plan: the LP's streamed fraction per kind of block, rounded to whole blocks.

    When the LP is infeasible every block is streamed, and the prediction shows by how much it misses.
    """
    w = req.workload
    fmt = weights_format(req.compute_dtype)
    fractions = solve_fractions(req)
    if fractions is None:
        # The LP has no feasible point: FlexGen cannot place the model. Everything streamed; the memory
        # check then says by how much it does not fit.
        streamed = {b.name for b in w.blocks}
        notes = ["LP infeasible: even with every block streamed the budget is exceeded"]
    else:
        streamed = streamed_blocks(req, fractions)
        shown = ", ".join(f"{c} {x:.0%}" for c, x in fractions.items()) or "none (all fits)"
        notes = [f"LP streamed fractions: {shown}; {len(streamed)} of {len(w.blocks)} blocks streamed "
                 f"({fmt_bytes(sum(w.by_name[n].nbytes(fmt) for n in streamed))}) at {fmt}, "
                 "4-bit compression off"]
    resident = {b.name for b in w.blocks} - streamed
    return build_plan(req, NAME, split_blocks(w, resident, fmt, req.compute_dtype), EXECUTION, notes=notes)
