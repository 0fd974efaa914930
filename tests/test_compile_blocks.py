"""Capture-safe world-model blocks and the `compiled` execution mode, on the CPU with fast compile backends.

What is counted: the graphs dynamo compiles for DiTBlock.forward (CompileCounter's frame_count, or dynamo's
counters["stats"]["unique_graphs"] for the runtime, which names its backend by $RESIDENCY_COMPILE_BACKEND).
Every layer shares the class's graphs; the graphs differ only by pass kind (denoise read, commit write) and
the KV window's fill while it fills, so they stop growing once the window is full. The backends are "eager"
and "aot_eager" (tracing, and AOT autograd's functionalisation for the second, without inductor's codegen):
capture correctness in seconds; tools/bench_compile.py times inductor.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from pipelines.world_model import PRESETS, WorldModelPipeline
from pipelines.world_model.dit import DiTBlock
from pipelines.world_model.workload import catalog_entry
from residency.errors import ResidencyError
from residency.plan import BlockPlan, Budget, Execution, Plan
from residency.runtime import Runtime
from residency.runtime.compiled import COMPILE_BACKEND_ENV
from residency.workload import workload_from_dict

pytestmark = pytest.mark.usefixtures("one_compute_thread")

CONFIG = PRESETS["tiny"].replace(context_frames=4)  # a short window: filled, then run past, in few frames
RECOMPILE_LIMIT = torch._dynamo.config.recompile_limit  # past it dynamo runs eagerly: counts would stop


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def workload():
    return workload_from_dict(catalog_entry(CONFIG))


def _latents(pipe, image, frames, step=None, seed=3):
    """The latent of each frame (F32), the session run plainly or through `step(session, action)`."""
    session = pipe.start(image, seed=seed)
    out = []
    for i in range(frames):
        action = ("up", "left", "idle", "jump")[i % 4]
        step(session, action) if step else session.step(action)
        out.append(session.last_latent.clone())
    return out


def _assert_close(got, expected):
    """F32 latents of a rollout. Per block call a compiled block is within ~1e-7 of an eager one (dynamo
    rewrites temporal_rope.rotate_'s addcmul_(value=-1.0) into an fma that rounds otherwise); fed back through
    the KV cache frame after frame, that grows to ~3e-5 by the 10th frame and ~1.4e-4 by the 25th (measured),
    hence 1e-3 and not 1e-5. A capture bug (a stale weight, a wrong KV slot) differs by O(1)."""
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_every_layer_shares_the_graphs_and_a_full_window_compiles_nothing_more(image, backend):
    pipe = WorldModelPipeline.from_config(CONFIG)
    slots = CONFIG.context_frames
    frames = slots + 6
    expected = _latents(pipe, image, frames)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(DiTBlock.forward, backend=counter, fullgraph=True)
    for block in pipe.dit.blocks:
        block.forward = types.MethodType(compiled, block)
    session = pipe.start(image, seed=3)  # the anchor's commit: every layer, one graph
    assert counter.frame_count == 1
    graphs, got = [], []
    for i in range(frames):
        session.step(("up", "left", "idle", "jump")[i % 4])
        got.append(session.last_latent.clone())
        graphs.append(counter.frame_count)
    _assert_close(got, expected)
    # The window is full from frame `slots` on: its read and its commit shapes compile at that frame, then none.
    assert len(set(graphs[slots:])) == 1, graphs
    # A fixed set: at most one graph per (pass kind, fill) while filling, never one per layer or per frame.
    assert graphs[-1] <= 2 * (slots + 1) and graphs[-1] < RECOMPILE_LIMIT, graphs


def _plan(w, placement, exec_mode="eager", depth=1, compiled=lambda name: name.startswith("dit.blocks")) -> Plan:
    blocks = tuple(BlockPlan(b.name, placement, "F32", "fp32",
                             exec_mode=exec_mode if compiled(b.name) else "eager") for b in w.blocks)
    return Plan(model=w.name, workload_fingerprint=w.fingerprint(), profile="test", profile_fingerprint="test",
                policy="test", budget=Budget(2**31), blocks=blocks, execution=Execution(prefetch_depth=depth),
                steps=w.steps, context_frames=w.context_frames)


def _run(pipe, image, workload, plan, frames):
    rt = Runtime(plan, "cpu", workload=workload).attach(pipe)
    try:
        graphs = []

        def step(session, action):
            rt.step(session, action)
            graphs.append(counters["stats"]["unique_graphs"])
        return _latents(pipe, image, frames, step), graphs, rt
    finally:
        rt.detach()


@pytest.mark.parametrize("placement", ["resident", "streamed"])
def test_compiled_blocks_under_the_runtime_equal_the_eager_runtime(monkeypatch, image, workload, placement):
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    pipe = WorldModelPipeline.from_config(CONFIG)
    warmup = CONFIG.context_frames + 1  # the window fills: the last new shape compiles at frame context_frames
    frames = warmup + 20
    expected, _, _ = _run(pipe, image, workload, _plan(workload, placement), frames)
    got, graphs, rt = _run(pipe, image, workload, _plan(workload, placement, "compiled"), frames)
    _assert_close(got, expected)
    assert rt.notes == []  # nothing fell back to eager
    # Streamed weights are rebound (`.data` = a slot's view) before every call: no recompile follows.
    assert graphs[0] > 0 and len(set(graphs[warmup:])) == 1, graphs
    assert graphs[-1] < RECOMPILE_LIMIT


def test_detach_restores_the_forwards_exactly(monkeypatch, image, workload):
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "eager")
    pipe = WorldModelPipeline.from_config(CONFIG)
    wrapped = pipe.dit.blocks[0]
    own = types.MethodType(DiTBlock.forward, wrapped)  # a forward of its own: another library's wrapper
    wrapped.forward = own
    before = _latents(pipe, image, 2)
    rt = Runtime(_plan(workload, "streamed", "compiled", compiled=lambda n: n != "dit"), "cpu",
                 workload=workload).attach(pipe)
    assert all("forward" in m.__dict__ for m in pipe.dit.blocks)
    assert rt.notes == ["block dit.blocks.0: DiTBlock has a forward of its own (a wrapper); left eager"]
    rt.detach()
    assert wrapped.__dict__["forward"] is own
    assert not [m for m in pipe.modules() if m is not wrapped and "forward" in m.__dict__]
    assert all(torch.equal(a, b) for a, b in zip(_latents(pipe, image, 2), before, strict=True))


def test_graphed_is_refused_on_the_cpu_backend(workload):
    pipe = WorldModelPipeline.from_config(CONFIG)
    data = [p.data_ptr() for p in pipe.parameters()]
    rt = Runtime(_plan(workload, "resident", "graphed"), "cpu", workload=workload)
    with pytest.raises(ResidencyError, match="graphed needs a CUDA/ROCm backend"):
        rt.attach(pipe)
    assert [p.data_ptr() for p in pipe.parameters()] == data
    assert not [m for m in pipe.modules() if "forward" in m.__dict__]


def test_a_failed_compile_runs_the_block_eagerly_with_a_note(monkeypatch, image, workload):
    def failing(gm, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.register_backend(failing, name="residency_test_failing")
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "residency_test_failing")
    pipe = WorldModelPipeline.from_config(CONFIG)
    expected = _latents(pipe, image, 2)
    got, _, rt = _run(pipe, image, workload, _plan(workload, "resident", "compiled"), 2)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    assert len(rt.notes) == 1 and "DiTBlock.forward" in rt.notes[0] and "eagerly" in rt.notes[0]


def test_an_unknown_backend_name_runs_eagerly_with_a_note(monkeypatch, workload):
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "no-such-backend")
    pipe = WorldModelPipeline.from_config(CONFIG)
    rt = Runtime(_plan(workload, "resident", "compiled"), "cpu", workload=workload).attach(pipe)
    rt.detach()
    assert len(rt.notes) == 1 and "no-such-backend" in rt.notes[0]


def test_exec_mode_is_a_checked_plan_field():
    assert BlockPlan("b", "resident", "F32").exec_mode == "eager"
    with pytest.raises(ResidencyError, match="exec_mode"):
        BlockPlan("b", "resident", "F32", exec_mode="jit")
    assert dataclasses.replace(BlockPlan("b", "resident", "F32"), exec_mode="compiled") != BlockPlan(
        "b", "resident", "F32")
