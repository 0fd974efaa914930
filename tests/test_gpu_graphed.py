"""`graphed` blocks on a real GPU: CUDA/HIP graphs of streamed blocks compute what eager blocks compute, a slot
is refilled only after the replay that read it, and a block that synchronises the host is never captured (it
falls back to eager with a note). Skipped without a GPU; tests/test_graphed_blocks.py checks the logic on the
CPU with a capture double."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.world_model import WorldModelPipeline
from pipelines.world_model.dit import DiTBlock, FinalLayer
from pipelines.world_model.workload import catalog_entry
from residency.plan import BlockPlan, Budget, Execution, Plan
from residency.runtime import Runtime
from residency.runtime.graphed import GraphedForwards
from residency.workload import workload_from_dict

pytestmark = pytest.mark.gpu

ACTIONS = ("up", "left", "idle", "jump", "up", "left", "idle")  # past the tiny window's fill
MEAN_LEVELS_TOLERANCE = 3.0  # as tests/test_gpu_runtime.py: reordered bf16 math moves frames by < 1 level


@pytest.fixture(scope="module")
def workload():
    return workload_from_dict(catalog_entry("tiny"))


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def plan_for(w, placement: str, exec_mode: str, depth: int = 1) -> Plan:
    """The DiT blocks `placement` and `exec_mode`; the small blocks around them resident and eager."""
    blocks = tuple(BlockPlan(b.name, placement, "BF16", "bf16", exec_mode=exec_mode)
                   if b.name.startswith("dit.blocks.") else BlockPlan(b.name, "resident", "BF16", "bf16")
                   for b in w.blocks)
    return Plan(model=w.name, workload_fingerprint=w.fingerprint(), profile="test", profile_fingerprint="test",
                policy="test", budget=Budget(2**31), blocks=blocks, execution=Execution(prefetch_depth=depth),
                steps=w.steps, context_frames=w.context_frames)


def rollout(pipe, w, image, plan: Plan):
    rt = Runtime(plan, "cuda", workload=w).attach(pipe)
    try:
        s = pipe.start(image, seed=3)
        frames = [rt.step(s, a) for a in ACTIONS]
        graphed = rt._compiled.graphed
        counts = (graphed.captures, graphed.replays) if graphed is not None else (0, 0)
    finally:
        rt.detach()
    return frames, rt, counts


def mean_levels_apart(a, b) -> float:
    return max(float(np.abs(x.astype(np.int16) - y.astype(np.int16)).mean()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("placement,depth", [("streamed", 1), ("streamed", 2), ("resident", 1)])
def test_graphed_blocks_equal_eager_blocks(workload, image, placement, depth):
    pipe = WorldModelPipeline.from_config("tiny", dtype=torch.bfloat16)
    expected, _, _ = rollout(pipe, workload, image, plan_for(workload, placement, "eager", depth))
    got, rt, (captures, replays) = rollout(pipe, workload, image, plan_for(workload, placement, "graphed", depth))
    assert rt.notes == []
    assert captures > 0 and replays > captures
    assert mean_levels_apart(got, expected) < MEAN_LEVELS_TOLERANCE


def test_a_refill_never_overtakes_the_slow_replay_that_read_the_slot(monkeypatch, workload, image):
    """Each DiT block's graph spins ~2 ms before computing: were the refill of its slot not ordered after the
    replay by the compute stream's event, the copy stream would overwrite the weights under it (other weights:
    tens of levels apart)."""
    eager_forward = DiTBlock.forward

    def slow(self, x, c, context):
        torch.cuda._sleep(int(2e-3 * 2e9))  # a kernel: captured into the graph, so the replay is slow
        return eager_forward(self, x, c, context)

    pipe = WorldModelPipeline.from_config("tiny", dtype=torch.bfloat16)
    expected, _, _ = rollout(pipe, workload, image, plan_for(workload, "streamed", "eager"))
    monkeypatch.setattr(DiTBlock, "forward", slow)
    got, rt, (captures, replays) = rollout(pipe, workload, image, plan_for(workload, "streamed", "graphed"))
    assert rt.notes == [] and replays > 0
    assert mean_levels_apart(got, expected) < MEAN_LEVELS_TOLERANCE


def test_a_block_that_synchronises_the_host_is_not_captured_and_runs_eagerly(monkeypatch, workload, image):
    eager_forward = FinalLayer.forward

    def syncing(self, x, c):
        if float(x.float().abs().sum().item()) < 0:  # .item(): a host sync, refused under capture
            raise AssertionError("unreachable")
        return eager_forward(self, x, c)

    monkeypatch.setattr(FinalLayer, "forward", syncing)
    pipe = WorldModelPipeline.from_config("tiny", dtype=torch.bfloat16)
    expected, _, _ = rollout(pipe, workload, image, plan_for(workload, "streamed", "eager"))
    plan = plan_for(workload, "streamed", "graphed")
    blocks = tuple(dataclasses.replace(bp, exec_mode="graphed") if bp.name == "dit.final" else bp
                   for bp in plan.blocks)
    got, rt, _ = rollout(pipe, workload, image, dataclasses.replace(plan, blocks=blocks))
    assert [n for n in rt.notes if "FinalLayer.forward" in n and "capture failed" in n], rt.notes
    assert mean_levels_apart(got, expected) < MEAN_LEVELS_TOLERANCE


def test_a_replay_reads_the_slot_it_was_captured_with():
    from residency.runtime.backend_cuda import CudaGraphCapture

    torch.manual_seed(0)
    device = torch.device("cuda")
    refs = [nn.Linear(64, 64, device=device) for _ in range(2)]
    runner = nn.Linear(64, 64, device=device)
    slots = [[torch.empty_like(p) for p in runner.parameters()] for _ in range(2)]
    notes: list[str] = []
    graphed = GraphedForwards(CudaGraphCapture(device), device, notes)
    graphed.install("b", runner)
    with torch.inference_mode():
        for _ in range(3):
            for slot, ref in enumerate(refs):
                for p, buf, w in zip(runner.parameters(), slots[slot], ref.parameters(), strict=True):
                    buf.copy_(w)
                    p.data = buf
                x = torch.randn(8, 64, device=device)
                torch.testing.assert_close(runner(x), ref(x))
    assert graphed.captures == 2 and graphed.replays == 4 and notes == []
    graphed.restore()


def _graphed_linear():
    """A 64-wide Linear on the GPU with graphed forwards installed: (device, module, GraphedForwards, notes)."""
    from residency.runtime.backend_cuda import CudaGraphCapture

    torch.manual_seed(0)
    device = torch.device("cuda")
    runner = nn.Linear(64, 64, device=device)
    notes: list[str] = []
    graphed = GraphedForwards(CudaGraphCapture(device), device, notes)
    graphed.install("b", runner)
    return device, runner, graphed, notes


def test_an_expanded_argument_is_graphed_like_a_dense_one():
    """A broadcast argument (stride 0) gets a dense static copy: an overlapping one would refuse copy_."""
    device, runner, graphed, notes = _graphed_linear()
    with torch.inference_mode():
        for _ in range(2):
            x = torch.randn(1, 64, device=device).expand(8, 64)
            torch.testing.assert_close(runner(x), nn.functional.linear(x.contiguous(), runner.weight, runner.bias))
    assert graphed.captures == 1 and graphed.replays == 1 and notes == []
    graphed.restore()


def test_a_call_under_caching_autocast_runs_eagerly():
    """autocast caches a weight's cast copy and frees it when its region ends: a graph captured under it would
    read freed memory (torch's make_graphed_callables refuses such autocast too)."""
    device, runner, graphed, notes = _graphed_linear()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        x = torch.randn(8, 64, device=device)
        for _ in range(2):
            torch.testing.assert_close(runner(x), nn.functional.linear(x, runner.weight, runner.bias))
    assert graphed.captures == 0 and graphed.replays == 0
    graphed.restore()


# The two tests below make a capture fail on purpose; they run last in this file because a torch whose
# CUDAGraph::capture_end skips endAllocateToPool on error (pytorch/pytorch#180395) leaves the caching allocator
# "capturing" for the rest of the process.
def _syncs_the_host(t: torch.Tensor) -> None:
    if t.sum().item() < 0:  # .item(): a device->host copy and a stream sync, refused under capture
        raise AssertionError("unreachable")


def test_a_failed_capture_leaves_the_caller_on_its_own_stream():
    """torch.cuda.graph.__exit__ raises from capture_end() before leaving its stream context; the capture's own
    context must put the caller back, or its later work runs on the side stream, outside the copy's events."""
    from residency.runtime.backend_cuda import CudaGraphCapture

    capture = CudaGraphCapture(torch.device("cuda"))
    before = torch.cuda.current_stream()
    with pytest.raises(RuntimeError):
        capture.capture(_syncs_the_host, (torch.ones(4, device="cuda"),))
    assert torch.cuda.current_stream() == before


def test_a_capture_after_a_failed_one_still_captures_and_replays():
    """After a block's capture failed, the next class must still capture in the shared pool (torch.cuda.graph
    empties the allocator's cache first, which torch refuses while it believes a capture is underway)."""
    from residency.runtime.backend_cuda import CudaGraphCapture

    capture = CudaGraphCapture(torch.device("cuda"))
    x = torch.zeros(4, device="cuda")
    out = torch.empty_like(x)
    with pytest.raises(RuntimeError):
        capture.capture(_syncs_the_host, (x,))
    replay = capture.capture(lambda t: out.copy_(t * 2), (x,))
    x.copy_(torch.arange(4.0))
    replay()
    torch.testing.assert_close(out.cpu(), torch.arange(4.0) * 2)
