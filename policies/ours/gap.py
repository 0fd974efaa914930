"""The plain statement of why a frame budget cannot be held, and what would hold it.

"needs 43.0 ms at 6.00 GiB; budget 33.0 ms — would hold with 9.10 GiB, or at Q4_K everywhere".
"""

from __future__ import annotations

from dataclasses import replace

from policies.base import PlanRequest, build_plan, fits_memory, uniform_blocks, weights_format
from policies.ours.milp import solve
from policies.ours.modes import choose_modes, with_modes
from policies.ours.options import block_classes
from policies.ours.problem import problem_for, to_plan
from residency.plan import BlockPlan, Budget, Execution, Plan
from residency.units import fmt_bytes

COARSEST = "Q4_K"


def _solve_plan(req: PlanRequest, kv_dtype: str, *, vram_bytes: int | None, frame_s: float | None,
                objective: str, formats: tuple[str, ...] | None = None, budget: Budget | None = None) -> Plan | None:
    execution = Execution(prefetch_depth=1)
    classes = block_classes(req.workload, req, execution, kv_dtype, **({"formats": formats} if formats else {}))
    if formats:  # restrict every frame block to the given formats (fallback vectors stay BF16)
        classes = [replace(c, options=tuple(o for o in c.options if o.format in formats) or c.options)
                   for c in classes]
    sol = solve(problem_for(req, classes, execution, kv_dtype, vram_bytes=vram_bytes, frame_s=frame_s,
                            objective=objective))
    if sol is None:
        return None
    sub = replace(req, budget=budget) if budget else req
    return to_plan(sub, classes, sol, execution, kv_dtype)


def gap_statement(req: PlanRequest, best: Plan, kv_dtype: str) -> str | None:
    """Why `best` misses the frame budget and what would hold it (more VRAM, coarser format).

    None when there is no frame budget, `best` does not fit memory, or it holds the budget.
    Cost: up to six MILP solves, each plan simulated.
    """
    frame_ms = req.budget.frame_ms
    p = best.prediction
    if frame_ms is None or p is None or not fits_memory(best) or p.frame_ms <= frame_ms:
        return None
    head = (f"needs {p.frame_ms:.1f} ms at {fmt_bytes(req.budget.vram_bytes)}; "
            f"budget {frame_ms:.1f} ms")
    # Everything resident at full precision, with unlimited memory: the compute floor of this device.
    roomy = Budget(2**62, frame_ms)
    # Quantized weights only add dequant work once resident, so this is the fastest the device can go.
    resident = build_plan(replace(req, budget=roomy), "ours", _all_resident(req, kv_dtype), Execution())
    if resident.prediction.frame_ms > frame_ms:
        return (f"{head} — cannot hold on {req.profile.name} at any VRAM: compute alone takes "
                f"{resident.prediction.frame_ms:.1f} ms with every block resident")
    parts = []
    # The linear model misses the simulator's stalls: tighten its frame budget until the plan holds.
    # At the KV dtype the planner takes when memory allows (the workload's, unless the request names one): at the
    # FP8 cache a smaller budget fell back to, the size named held nothing ("would hold with 596.2 MiB", and at
    # 596.2 MiB the cache was BF16 again and the plan missed: 709.6 MiB was named then)
    wanted = req.kv_dtype or req.workload.kv_dtype
    for margin in (1.0, 0.99, 0.97, 0.94, 0.9):
        enough = _solve_plan(req, wanted, vram_bytes=None, frame_s=frame_ms / 1e3 * margin, objective="memory",
                             budget=roomy)
        if enough is not None and enough.prediction.frame_ms <= frame_ms:
            parts.append(f"would hold with {fmt_bytes(enough.prediction.peak_total_bytes)}")
            break
    coarse = _solve_plan(req, kv_dtype, vram_bytes=req.budget.vram_bytes, frame_s=None, objective="time",
                         formats=(COARSEST,))
    if coarse is not None and fits_memory(coarse) and coarse.prediction.frame_ms <= frame_ms:
        parts.append(f"at {COARSEST} everywhere")
    return f"{head} — " + (", or ".join(parts) if parts else "no plan found that holds it")


def _all_resident(req: PlanRequest, kv_dtype: str) -> list[BlockPlan]:
    blocks = uniform_blocks(req.workload, "resident", weights_format(req.compute_dtype), req.compute_dtype)
    return with_modes(blocks, choose_modes(req, kv_dtype), req.workload)
