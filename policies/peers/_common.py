"""Helpers the peer policies share: the memory a run needs beside the weights, greedy residency, and the
execution modes a request lets a peer use.

Each peer sizes its weight budget its own way; these only state the quantities they start from.

Execution modes (BlockPlan.exec_mode): each peer runs the mode its own documentation gives it, among the modes
the request allows (`allowed_modes`): PlanRequest.exec_mode "eager" (the default: the comparison of before modes
existed) allows eager only; "auto" and "compiled" allow eager and compiled (what the runtime runs); "auto+graphed"
and "graphed" allow graphed too, on a GPU profile. A peer whose documented mode is not allowed falls back as its
module says (`fallback_mode`: graphed → compiled → eager).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from policies.base import PlanRequest
from residency.errors import ResidencyError
from residency.plan import BlockPlan
from residency.simulate.memory import GPU_WORKSPACE_BYTES
from residency.workload import Workload


def kv_dtype(req: PlanRequest) -> str:
    """The KV storage dtype the request asks for, else the workload's default."""
    return req.kv_dtype or req.workload.kv_dtype


def inference_bytes(req: PlanRequest) -> int:
    """KV cache at its full window plus the largest block's live activations: what a run needs beside weights."""
    w = req.workload
    act = max((b.activation_bytes(req.compute_dtype, w.batch) for b in w.blocks), default=0)
    return w.kv_cache_bytes(kv_dtype(req)) + act


def workspace_bytes(req: PlanRequest) -> int:
    """Matmul-library workspace the simulator counts on a GPU (none on the CPU backend)."""
    return GPU_WORKSPACE_BYTES if req.profile.is_gpu else 0


def fill_greedy(w: Workload, fmt: str, order: Iterable[str], budget_bytes: float,
                stop_at_first_miss: bool) -> set[str]:
    """Blocks taken in `order` while their bytes at `fmt` stay strictly under `budget_bytes`.

    `stop_at_first_miss`: stop at the first block that does not fit (else skip it and try the next).
    """
    used, chosen = 0, set()
    for name in order:
        size = w.by_name[name].nbytes(fmt)
        if used + size < budget_bytes:
            used += size
            chosen.add(name)
        elif stop_at_first_miss:
            break
    return chosen


def split_blocks(w: Workload, resident: set[str], fmt: str, compute_dtype: str,
                 dequant_on: str = "compute") -> list[BlockPlan]:
    """Blocks in `resident` live on the device for the session; the rest are streamed at `fmt`."""
    return [BlockPlan(b.name, "resident", fmt, compute_dtype) if b.name in resident
            else BlockPlan(b.name, "streamed", fmt, compute_dtype, dequant_on=dequant_on)
            for b in w.blocks]


# the modes each request mode lets a peer use, before the backend check (graphs need a GPU)
_ALLOWED = {"eager": ("eager",), "auto": ("eager", "compiled"), "compiled": ("eager", "compiled"),
            "auto+graphed": ("eager", "compiled", "graphed"), "graphed": ("eager", "compiled", "graphed")}


def allowed_modes(req: PlanRequest) -> tuple[str, ...]:
    """The execution modes a peer may use under the request: eager always; compiled unless the request is
    "eager"; graphed only where the request simulates graphs ("auto+graphed", "graphed") on a GPU profile."""
    modes = _ALLOWED.get(req.exec_mode)
    if modes is None:
        raise ResidencyError(f"exec mode {req.exec_mode!r} is not one of {', '.join(_ALLOWED)}",
                             hint="use --exec-mode eager, compiled, graphed, auto or auto+graphed")
    return modes if req.profile.is_gpu else tuple(m for m in modes if m != "graphed")


def fallback_mode(req: PlanRequest, documented: str) -> str:
    """`documented` when the request allows it, else the next one down: graphed → compiled → eager."""
    order = ("graphed", "compiled", "eager")
    allowed = allowed_modes(req)
    return next(m for m in order[order.index(documented):] if m in allowed)


def with_exec_modes(blocks: Sequence[BlockPlan], mode_of: dict[str, str]) -> list[BlockPlan]:
    """`blocks` with the exec_mode `mode_of` names for them (the others unchanged)."""
    return [replace(bp, exec_mode=mode_of[bp.name]) if bp.name in mode_of else bp for bp in blocks]
