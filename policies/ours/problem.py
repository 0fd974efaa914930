"""Between a request and the MILP: the problem a request poses, and a solution read back as a Plan.

Shared by the search, the gap statement and the no-fit fallback, so each builds its problem one way.
"""

from __future__ import annotations

from policies.base import PlanRequest, build_plan
from policies.ours.milp import Problem, Solution, solve
from policies.ours.modes import choose_modes
from policies.ours.options import BlockClass, block_classes
from residency.plan import BlockPlan, Execution, Plan
from residency.simulate.bounds import interference_coefficients
from residency.simulate.memory import GPU_WORKSPACE_BYTES


def fixed_bytes(req: PlanRequest, kv_dtype: str) -> int:
    """Device memory no option changes: the KV cache, the largest block's activations, a GPU's workspace."""
    w = req.workload
    act = max((b.activation_bytes(req.compute_dtype, w.batch) for b in w.blocks), default=0)
    return (w.kv_cache_bytes(kv_dtype) + act + (GPU_WORKSPACE_BYTES if req.profile.is_gpu else 0)
            + _graph_pool_bytes(req, kv_dtype))


def _graph_pool_bytes(req: PlanRequest, kv_dtype: str) -> int:
    """The pools of the block classes chosen graphed, as residency.simulate.memory.graph_pool_bytes counts
    them (0 on the CPU or with none graphed)."""
    if not req.profile.is_gpu:
        return 0
    w = req.workload
    graphed = {c for c, ch in choose_modes(req, kv_dtype).items() if ch.mode == "graphed"}
    per_class: dict[str, int] = {}
    for b in w.blocks:
        if b.block_class in graphed:
            act = b.activation_bytes(req.compute_dtype, w.batch)
            per_class[b.block_class] = max(per_class.get(b.block_class, 0), act)
    return sum(a + req.profile.graph_pool_bytes_per_class for a in per_class.values())


def problem_for(req: PlanRequest, classes: list[BlockClass], execution: Execution, kv_dtype: str, *,
                vram_bytes: int | None, frame_s: float | None, objective: str) -> Problem:
    """The MILP problem for the request: its classes, slots, overlap, fixed bytes and limits.

    `vram_bytes` and `frame_s` (seconds) bound memory and frame time (None: unbounded); `objective` is
    what to minimise ("loss", "time" or "memory").
    """
    return Problem(classes, execution.slots, interference_coefficients(req.profile), fixed_bytes(req, kv_dtype),
                   vram_bytes, frame_s, objective, node_limit=req.options.milp_node_limit)


def spread(classes: list[BlockClass], counts: list[list[int]], compute_dtype: str) -> dict[str, BlockPlan]:
    """Class counts -> one option per block, each option spread evenly over the class's members, so
    streamed blocks alternate with resident ones and their copies hide under the neighbours' compute."""
    out = {}
    for c, n in zip(classes, counts, strict=True):
        given = [0] * len(n)
        total = len(c.blocks)
        for i, name in enumerate(c.blocks):
            oi = max(range(len(n)), key=lambda o: (n[o] * (i + 1) / total - given[o], n[o]))
            given[oi] += 1
            lifetime = "session" if c.calls_per_frame else "phase"
            out[name] = c.options[oi].block_plan(name, compute_dtype, lifetime)
    return out


def to_plan(req: PlanRequest, classes: list[BlockClass], sol: Solution, execution: Execution,
            kv_dtype: str) -> Plan:
    """The solution's placements in the workload's block order, scored by the simulator."""
    by_name = spread(classes, sol.counts, req.compute_dtype)
    blocks = [by_name[b.name] for b in req.workload.blocks]
    return build_plan(req, "ours", blocks, execution, kv_dtype=kv_dtype)


def least_memory_plan(req: PlanRequest, kv_dtype: str) -> Plan:
    """The plan that needs the least device memory: shown, with what it needs, when no plan fits."""
    execution = Execution(prefetch_depth=1)
    classes = block_classes(req.workload, req, execution, kv_dtype)
    # Capped like every other solve of the request, by the same node count: the same answer under any load.
    sol = solve(problem_for(req, classes, execution, kv_dtype, vram_bytes=None, frame_s=None, objective="memory"))
    return to_plan(req, classes, sol, execution, kv_dtype)


__all__ = ["fixed_bytes", "least_memory_plan", "problem_for", "spread", "to_plan"]
