"""Helpers the peer policies share: the memory a run needs beside the weights, and greedy residency.

Each peer sizes its weight budget its own way; these only state the quantities they start from.
"""

from __future__ import annotations

from collections.abc import Iterable

from policies.base import PlanRequest
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
