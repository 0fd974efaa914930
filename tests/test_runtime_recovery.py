"""Recovery: a budget cut or an out-of-memory mid-step re-plans, re-attaches and continues the session."""

from __future__ import annotations

import gc
import json

import numpy as np
import psutil
import pytest
import torch
from sim_helpers import flat_profile
from test_runtime import tiny_plan

from pipelines.world_model import WorldModelPipeline
from pipelines.world_model.workload import catalog_entry
from residency.plan import Budget
from residency.runtime import DeviceBudgetExceeded, Runtime
from residency.telemetry import write_chrome_trace
from residency.workload import workload_from_dict


@pytest.fixture(scope="module")
def workload():
    return workload_from_dict(catalog_entry("tiny"))


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


pytestmark = pytest.mark.usefixtures("one_compute_thread")


WARM = 12  # tiny keeps 12 context frames: after 12 the window is full and a commit overwrites a slot


PROFILE = flat_profile(backend="cpu")


def _plans(w):
    """The big plan, and replan(budget, profile): streamed Q8_0 at that budget."""
    big = tiny_plan(w, "resident", profile=PROFILE)  # ~25 MiB
    return big, (lambda budget, profile: tiny_plan(w, "streamed", "Q8_0", vram=budget.vram_bytes, profile=profile))


def _cut_at(module, when, action):
    """A forward hook that runs `action` once, at the `when`-th call of `module`."""
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1
        if calls["n"] == when:
            action()
    return module.register_forward_hook(hook)


def _reference(pipe, image, w, actions, warm_actions):
    """Uninterrupted: the warm frames under the big plan, then the small plan from that same state."""
    big, replan = _plans(w)
    rt = Runtime(big, "cpu", workload=w).attach(pipe)
    s = pipe.start(image, seed=5)
    for a in warm_actions:
        rt.step(s, a)
    rt.detach()
    rt = Runtime(replan(Budget(12 * 2**20), PROFILE), "cpu", workload=w).attach(pipe)
    out = [rt.step(s, a) for a in actions]
    rt.detach()
    return out


@pytest.mark.parametrize("where", ["denoise", "commit"])
def test_budget_cut_mid_step_recovers_and_matches_the_new_plan_from_the_same_state(workload, image, where):
    pipe = WorldModelPipeline.from_config("tiny")
    warm = ["up", "left"] * (WARM // 2)
    actions = ["jump", "right", "idle"]
    expected = _reference(pipe, image, workload, actions, warm)
    big, replan = _plans(workload)
    rt = Runtime(big, "cpu", workload=workload, replan=replan, profile=PROFILE).attach(pipe)
    s = pipe.start(image, seed=5)
    for a in warm:
        rt.step(s, a)
    # denoise: during the 2nd Euler step; commit: after block 1 wrote its K/V over the oldest frame's slot
    block_calls = 1 + (pipe.config.steps if where == "commit" else 1)
    handle = _cut_at(pipe.dit.blocks[1], block_calls, lambda: rt.set_budget(12 * 2**20))
    got = [rt.step(s, a) for a in actions]
    handle.remove()
    rt.detach()
    assert [c for c, _ in rt.recoveries] == ["DeviceBudgetExceeded"]
    assert rt.plan.policy == "test" and rt.plan.streamed()
    assert s.frame_index == WARM + len(actions)
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)


def test_out_of_memory_shrinks_the_budget_and_continues(workload, image):
    pipe = WorldModelPipeline.from_config("tiny")
    big, replan = _plans(workload)
    expected = _reference(pipe, image, workload, ["down", "up"], ["up"])

    def oom():
        raise torch.OutOfMemoryError("injected: the device is full")
    rt = Runtime(big, "cpu", workload=workload, replan=replan, profile=PROFILE).attach(pipe)
    s = pipe.start(image, seed=5)
    rt.step(s, "up")
    held = rt.ledger.total_bytes
    handle = _cut_at(pipe.dit.blocks[0], 2, oom)
    got = [rt.step(s, a) for a in ["down", "up"]]
    handle.remove()
    rt.detach()
    assert rt.recoveries == [("OutOfMemoryError", int(held * 0.9))]
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)


def test_without_any_fitting_plan_the_error_is_clear(workload, image):
    pipe = WorldModelPipeline.from_config("tiny")
    big, replan = _plans(workload)
    rt = Runtime(big, "cpu", workload=workload, replan=replan, profile=PROFILE).attach(pipe)
    s = pipe.start(image, seed=5)
    rt.set_budget(2**20)  # below the KV cache and activations: no plan fits
    with pytest.raises(DeviceBudgetExceeded, match="no plan fits"):
        rt.step(s, "up")
    assert s.frame_index == 0 and s.window() == [0]
    rt.detach()


@pytest.mark.parametrize("frames", [120, pytest.param(500, marks=pytest.mark.slow)])
def test_long_sessions_do_not_grow_device_or_host_memory(workload, image, frames):
    pipe = WorldModelPipeline.from_config("tiny")
    rt = Runtime(tiny_plan(workload, "streamed", "Q8_0", depth=2), "cpu", workload=workload).attach(pipe)
    s = pipe.start(image, seed=1)
    for _ in range(50):  # past the KV window and the telemetry's first allocations
        rt.step(s, "up")
    gc.collect()
    rss0, ledger0 = psutil.Process().memory_info().rss, rt.ledger.total_bytes
    for i in range(frames - 50):
        rt.step(s, ("up", "left", "jump")[i % 3])
    gc.collect()
    rss1 = psutil.Process().memory_info().rss
    assert rt.ledger.total_bytes == ledger0 and rt.ledger.peak_total_bytes == ledger0
    assert rss1 - rss0 < 8 * 2**20, f"RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB over {frames - 50} frames"
    rt.detach()


def test_telemetry_frames_and_chrome_trace(workload, image, tmp_path):
    pipe = WorldModelPipeline.from_config("tiny")
    rt = Runtime(tiny_plan(workload, "streamed", "Q8_0"), "cpu", workload=workload).attach(pipe)
    s = pipe.start(image, seed=1)
    for _ in range(4):
        rt.step(s, "up")
    rt.detach()
    snap = rt.telemetry()
    latent = [f for f in snap.frames if f.frame >= 1]
    assert [f.frame for f in snap.frames] == [0, 1, 2, 3, 4]
    per_frame_bytes = sum(workload.by_name[b].nbytes("Q8_0") * workload.calls_per_frame(b)
                          for b in (bp.name for bp in rt.plan.blocks))
    assert all(f.link_bytes == per_frame_bytes for f in latent)
    assert all(f.compute_ms > 0 and f.copy_ms > 0 and f.dequant_ms > 0 and f.frame_ms >= f.compute_ms
               for f in latent)
    with pytest.raises(AttributeError):
        latent[0].frame_ms = 0.0  # frozen
    path = write_chrome_trace(snap, tmp_path / "trace.json")
    doc = json.loads(path.read_text())
    tracks = {e["tid"] for e in doc["traceEvents"] if e["ph"] == "X"}
    assert {1, 2, 3} <= tracks
    assert any(e["ph"] == "C" and e["args"]["bytes"] > 0 for e in doc["traceEvents"])
    assert not list(tmp_path.glob(".trace.json.*"))  # no temp file left behind
