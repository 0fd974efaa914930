"""A frame's measured time is the work the plan predicts (its units: a step, a call of the model); the caller's
time between frames is the frame's gap_ms, never in frame_ms, and a trace keeps both."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from sim_helpers import flat_profile
from torch import nn

import residency
from pipelines.world_model import WorldModelPipeline
from pipelines.world_model.workload import catalog_entry
from residency.dashboard import DashboardContext, read_trace, write_trace
from residency.plan import BlockPlan, Budget, Plan
from residency.runtime import Runtime
from residency.telemetry import Recorder
from residency.telemetry.chrome_trace import FRAME_TRACK
from residency.workload import workload_from_dict

pytestmark = pytest.mark.usefixtures("one_compute_thread")

SLEEP_S = 0.030  # the caller's time between steps
GAP_FLOOR_MS = 25.0  # what of it must show as the gap (time.sleep may not oversleep less than asked)
SLACK_MS = 2.0  # a frame's work against the step's wall time, measured around it on the host
PROFILE = flat_profile(backend="cpu")
CONTEXT = DashboardContext("units · test", vram_budget_bytes=64 * 2**20)


def _identity(marks):
    return marks


def _call(r: Recorder, frame: int, start_s: float, end_s: float) -> None:
    r.record(frame, 0, start_s, start_s, start_s, end_s, None, 0)


# --- the recorder, on hand-made marks (seconds) -------------------------------------------------------------
def test_a_frame_is_its_unit_and_the_time_to_the_next_unit_is_the_gap():
    r = Recorder(["a"], None)
    r.unit_start(0.000)
    _call(r, 1, 0.001, 0.009)
    r.unit_end(0.010)
    r.unit_start(0.040)  # 30 ms of the caller's time
    r.end_frame(_identity, 0, 0, next_start_mark=0.042)  # the next frame's first call
    _call(r, 2, 0.042, 0.049)
    r.unit_end(0.050)
    r.end_frame(_identity, 0, 0)  # detach: no next frame
    first, second = r.frames
    assert (first.start_s, first.frame_ms, first.gap_ms) == pytest.approx((0.0, 10.0, 30.0))
    assert first.period_ms == pytest.approx(40.0)
    assert (second.start_s, second.frame_ms, second.gap_ms) == pytest.approx((0.040, 10.0, 0.0))


def test_a_unit_running_several_frames_splits_at_their_first_calls():
    r = Recorder(["a"], None)
    r.unit_start(0.000)
    _call(r, 0, 0.002, 0.005)
    r.end_frame(_identity, 0, 0, next_start_mark=0.006)  # inside the unit: no gap
    _call(r, 1, 0.006, 0.010)
    r.unit_end(0.012)
    r.unit_start(0.030)
    r.end_frame(_identity, 0, 0, next_start_mark=0.031)
    f0, f1 = r.frames
    assert (f0.start_s, f0.frame_ms, f0.gap_ms) == pytest.approx((0.0, 6.0, 0.0))
    assert (f1.start_s, f1.frame_ms, f1.gap_ms) == pytest.approx((0.006, 6.0, 18.0))


def test_calls_outside_any_unit_span_first_call_to_last_end_and_a_failed_unit_is_dropped():
    r = Recorder(["a"], None)
    _call(r, 1, 0.000, 0.004)
    _call(r, 1, 0.005, 0.008)
    r.unit_start(0.020)
    r.unit_discard()  # failed before any call
    r.end_frame(_identity, 0, 0, next_start_mark=0.030)
    _call(r, 2, 0.030, 0.033)
    r.end_frame(_identity, 0, 0)
    f1, f2 = r.frames
    assert (f1.frame_ms, f1.gap_ms) == pytest.approx((8.0, 22.0))
    assert (f2.start_s, f2.frame_ms, f2.gap_ms) == pytest.approx((0.030, 3.0, 0.0))


# --- through the runtime --------------------------------------------------------------------------------------
def _check_work_and_gap(frames, step_ms: dict[int, float]) -> None:
    """Every frame with a measured step (and a next one) shows its work within the step and the sleep as gap."""
    checked = 0
    for f in frames:
        if f.frame not in step_ms or f is frames[-1]:
            continue
        assert f.frame_ms < step_ms[f.frame] + SLACK_MS, (f.frame, f.frame_ms, step_ms[f.frame])
        assert f.gap_ms >= GAP_FLOOR_MS, (f.frame, f.gap_ms)
        assert f.period_ms == pytest.approx(f.frame_ms + f.gap_ms)
        checked += 1
    assert checked >= 2


@pytest.fixture(scope="module")
def world_snapshot():
    """The tiny world model stepped through Runtime.step with SLEEP_S between steps: (snapshot, step ms)."""
    w = workload_from_dict(catalog_entry("tiny"))
    blocks = tuple(BlockPlan(b.name, "streamed" if b.name.startswith("dit.blocks") else "resident", "F32", "fp32")
                   for b in w.blocks)
    plan = Plan(model=w.name, workload_fingerprint=w.fingerprint(), profile="test", profile_fingerprint="-",
                policy="test", budget=Budget(2**31), blocks=blocks, steps=w.steps, context_frames=w.context_frames)
    pipe = WorldModelPipeline.from_config("tiny")
    rt = Runtime(plan, "cpu", workload=w).attach(pipe)
    session = pipe.start(np.zeros((64, 64, 3), np.uint8))
    step_ms = {}
    for i, action in enumerate(("right", "up", "idle", "jump"), start=1):
        t0 = time.perf_counter()
        rt.step(session, action)
        step_ms[i] = (time.perf_counter() - t0) * 1e3
        time.sleep(SLEEP_S)
    memory = rt.telemetry().memory
    rt.detach()
    return dataclasses.replace(rt.telemetry(), memory=memory), step_ms


def test_a_stepped_world_model_measures_the_step_and_reports_the_sleep_as_gap(world_snapshot):
    snapshot, step_ms = world_snapshot
    assert [f.frame for f in snapshot.frames] == [0, 1, 2, 3, 4]
    _check_work_and_gap(snapshot.frames, step_ms)
    assert snapshot.frames[-1].gap_ms == 0.0  # closed at detach: the next frame is unknown
    assert snapshot.steady_gap_ms(skip=0) >= GAP_FLOOR_MS


class Small(nn.Module):
    def __init__(self, dim: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        return x


def _forwards_with_sleep(rt, call, n: int = 5):
    """Call the attached model n times with SLEEP_S between; the frames and each call's wall ms by frame."""
    walls = []
    with rt, torch.inference_mode():
        for _ in range(n):
            t0 = time.perf_counter()
            call()
            walls.append((time.perf_counter() - t0) * 1e3)
            time.sleep(SLEEP_S)
        frames = list(rt.telemetry().frames)  # the last forward's too: it closed as its call ended (its gap unknown)
    return frames, dict(zip([f.frame for f in frames], walls, strict=False))


def test_a_plain_module_measures_its_forward_and_reports_the_sleep_as_gap():
    x = torch.randn(2, 32)
    model = Small()
    rt = residency.attach(model, vram="50%", profile=PROFILE, backend="cpu", example_inputs=x)
    frames, walls = _forwards_with_sleep(rt, lambda: model(x))
    assert len(frames) == 5 and frames[-1].gap_ms == 0.0
    _check_work_and_gap(frames, walls)


class TwoForwards:
    """A session whose step calls the attached model twice: the calls are part of the step's unit."""
    kv_cache_bytes = 0

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.model, self.x = model, x

    def snapshot(self, protect_kv: bool = True):
        return None

    def restore(self, snap) -> None:
        pass

    def step(self, action):
        return self.model(self.model(self.x))


def test_model_calls_inside_a_step_are_one_unit_split_at_each_frame():
    x = torch.randn(2, 32)
    model = Small()
    rt = residency.attach(model, vram="50%", profile=PROFILE, backend="cpu", example_inputs=x)
    session = TwoForwards(model, x)
    with rt, torch.inference_mode():
        for _ in range(3):
            rt.step(session, None)
            time.sleep(SLEEP_S)
        frames = list(rt.telemetry().frames)
    assert len(frames) == 6  # two forwards (frames) a step, the last closed as its step ended
    firsts, seconds = frames[0::2], frames[1::2]
    assert all(f.gap_ms == 0.0 for f in firsts)  # the step goes on into its second forward
    assert all(f.gap_ms >= GAP_FLOOR_MS for f in seconds[:-1])
    assert seconds[-1].gap_ms == 0.0  # no next step yet: its gap is not known
    assert all(f.frame_ms < GAP_FLOOR_MS for f in frames)


def test_a_diffusers_model_measures_its_forward_and_reports_the_sleep_as_gap():
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    sample, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    rt = residency.attach(unet, vram="100%", profile=PROFILE, backend="cpu", example_inputs=(sample, t))
    frames, walls = _forwards_with_sleep(rt, lambda: unet(sample, t))
    assert len(frames) == 5 and frames[-1].gap_ms == 0.0
    _check_work_and_gap(frames, walls)


# --- traces ---------------------------------------------------------------------------------------------------
def test_a_trace_keeps_each_frames_work_and_gap(world_snapshot, tmp_path):
    snapshot, _ = world_snapshot
    got, _ = read_trace(write_trace(snapshot, CONTEXT, tmp_path / "t.json"))
    assert [f.frame for f in got.frames] == [f.frame for f in snapshot.frames]
    for a, b in zip(got.frames, snapshot.frames, strict=True):
        assert a.frame_ms == pytest.approx(b.frame_ms, abs=1e-3)
        assert a.gap_ms == pytest.approx(b.gap_ms, abs=1e-3)


def test_a_trace_written_before_frame_spans_still_loads(world_snapshot, tmp_path):
    snapshot, _ = world_snapshot
    path = write_trace(snapshot, CONTEXT, tmp_path / "t.json")
    doc = json.loads(path.read_text())
    doc["traceEvents"] = [e for e in doc["traceEvents"] if e.get("cat") != FRAME_TRACK]
    path.write_text(json.dumps(doc))
    got, _ = read_trace(path)
    assert [f.frame for f in got.frames] == [f.frame for f in snapshot.frames]
    for f, rows in zip(got.frames, got.rows, strict=True):  # the calls alone: first call .. last call's end
        assert f.frame_ms == pytest.approx((rows[-1, 5] - rows[0, 2]) * 1e3, abs=1e-3)
        assert f.gap_ms >= 0.0
    assert got.frames[-1].gap_ms == 0.0
