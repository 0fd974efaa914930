"""Prefetch overlaps copies with compute on the CPU backend: a synthetic stack of big Linear blocks."""

from __future__ import annotations

import time

import torch
from torch import nn

from residency.plan import BlockPlan, Budget, Execution, Plan
from residency.runtime import Runtime
from residency.workload import BlockSpec, PassSpec, PhaseSpec, Workload


class LinearStack(nn.Module):
    """blocks() like a pipeline's: one Linear per unit of residency; forward() is one latent frame."""

    def __init__(self, depth: int, dim: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(depth))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.normal_(0.0, dim**-0.5)

    def blocks(self):
        return [(f"layers.{i}", m, "dit") for i, m in enumerate(self.layers)]

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def stack_workload(depth: int, dim: int, tokens: int) -> Workload:
    blocks = tuple(BlockSpec(f"layers.{i}", "dit", (("weight", (dim, dim)),), tokens, 2.0 * dim * dim)
                   for i in range(depth))
    phase = PhaseSpec("denoise", "latent_frame", (PassSpec(tuple(b.name for b in blocks)),))
    return Workload("linear-stack", blocks, (phase,), steps=1, context_frames=0)


def stack_plan(w: Workload, placement: str, depth: int = 1, copy_mode: str = "async") -> Plan:
    return Plan(model=w.name, workload_fingerprint=w.fingerprint(), profile="test", profile_fingerprint="test",
                policy="test", budget=Budget(2**33), blocks=tuple(BlockPlan(b.name, placement, "F32", "fp32")
                                                                   for b in w.blocks),
                execution=Execution(copy_mode=copy_mode, prefetch_depth=depth), steps=1, context_frames=0)


def _frame_s(model, x, frames=6) -> float:
    with torch.inference_mode():
        model(x)
        best = float("inf")
        for _ in range(frames):
            t = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t)
    return best


def _overlapped_fraction(model, w, x, mode: str) -> float:
    """Share of streamed calls whose copy began while the previous call was still computing."""
    from residency.telemetry.recorder import C_START, HAS_COPY, T_END

    rt = Runtime(stack_plan(w, "streamed", depth=1, copy_mode=mode), "cpu", workload=w).attach(model)
    try:
        _frame_s(model, x, frames=3)
        rows = rt.telemetry().rows[-1]
    finally:
        rt.detach()
    pairs = [(prev, cur) for prev, cur in zip(rows[:-1], rows[1:], strict=True) if cur[HAS_COPY] > 0]
    return sum(cur[C_START] < prev[T_END] for prev, cur in pairs) / len(pairs)


def test_prefetch_copies_the_next_block_while_the_previous_one_computes():
    """The schedule, not the stopwatch: with prefetch each copy is issued while the block before it is
    computing; with synchronous copies never. (Whether that makes the frame faster depends on a free core
    and is measured by tools/bench_runtime.py, not asserted in a test.)"""
    depth, dim, tokens = 8, 1024, 256  # each block computes ~1 ms: long enough to catch the copy inside
    w = stack_workload(depth, dim, tokens)
    model = LinearStack(depth, dim)
    x = torch.randn(1, tokens, dim)
    saved = torch.get_num_threads()
    assert _overlapped_fraction(model, w, x, "sync") == 0.0
    assert _overlapped_fraction(model, w, x, "async") >= 0.8
    assert torch.get_num_threads() == saved
