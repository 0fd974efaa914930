"""Prefetch overlaps copies with compute on the CPU backend: a synthetic stack of big Linear blocks."""

from __future__ import annotations

import time

import pytest
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


def _machine_overlap(dim: int, tokens: int, n: int = 8) -> float:
    """(thread copy beside matmul) / (copy + matmul) for raw torch ops: < 1 when a core is free for copies."""
    import threading

    weights = [torch.randn(dim, dim) for _ in range(n)]
    blobs, slot, x = [torch.randn(dim * dim) for _ in range(n)], torch.empty(dim * dim), torch.randn(tokens, dim)

    def compute():
        for m in weights:
            torch.nn.functional.linear(x, m)

    def copy():
        for b in blobs:
            slot.copy_(b)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    times = {}
    for name, fn in (("compute", compute), ("copy", copy)):
        fn()  # first touch of the destination pages is not copy time
        t = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - t
    t = time.perf_counter()
    th = threading.Thread(target=lambda: (torch.set_num_threads(1), copy()))
    th.start()
    compute()
    th.join()
    both = time.perf_counter() - t
    torch.set_num_threads(saved)
    return both / (times["compute"] + times["copy"])


def _async_vs_sync(w, model, x) -> dict[str, float]:
    best = {"async": float("inf"), "sync": float("inf")}
    for _ in range(2):
        for mode in best:
            rt = Runtime(stack_plan(w, "streamed", depth=1, copy_mode=mode), "cpu", workload=w).attach(model)
            best[mode] = min(best[mode], _frame_s(model, x, frames=4))
            rt.detach()
    return best


def test_prefetch_hides_copies_under_compute():
    """Streamed with prefetch vs the same copies and compute run back to back (copy_mode "sync", which
    measures copy + compute in the same memory conditions); modes interleaved, best of several frames.

    This 2-core box is shared: an attempt counts only when a raw copy thread can overlap a matmul at
    that moment; up to three attempts, and the test fails if the runtime never overlaps when it could.
    """
    depth, dim, tokens = 16, 1024, 16  # 4 MiB per block: it stays in the L3 between copy and matmul
    w = stack_workload(depth, dim, tokens)
    model = LinearStack(depth, dim)
    x = torch.randn(1, tokens, dim)
    saved = torch.get_num_threads()
    rt = Runtime(stack_plan(w, "streamed", depth=1, copy_mode="sync"), "cpu", workload=w).attach(model)
    _frame_s(model, x, frames=2)
    frame = rt.telemetry().frames[-1]
    rt.detach()
    assert frame.copy_ms > 0.2 * frame.compute_ms  # the copies are not negligible: there is something to hide
    attempts = []
    for _ in range(3):
        if _machine_overlap(dim, tokens, depth) > 0.9:
            continue
        best = _async_vs_sync(w, model, x)
        attempts.append(best)
        if best["async"] < 0.95 * best["sync"]:
            break
    assert torch.get_num_threads() == saved
    if not attempts:
        pytest.skip("no core is free for a copy thread right now (other processes load the CPU): "
                    "raw torch copy beside matmul takes their sum")
    assert any(b["async"] < 0.95 * b["sync"] for b in attempts), (
        "prefetch vs copy+compute ms per frame: "
        + ", ".join(f"{b['async'] * 1e3:.1f} vs {b['sync'] * 1e3:.1f}" for b in attempts))
