"""The run's closing line: the measured steady frame against the plan's prediction, and against the closed loop's
last re-prediction over the frames since it (not over every frame, which the loop never predicted)."""

from __future__ import annotations

import io

from rich.console import Console

from residency.commands.run_cmd import report_speed
from residency.plan import Prediction
from residency.telemetry.events import LoopEvent
from residency.telemetry.recorder import FrameRecord, TelemetrySnapshot


def _frame(i: int, ms: float, predicted: float) -> FrameRecord:
    return FrameRecord(frame=i, start_s=float(i), frame_ms=ms, compute_ms=ms, copy_ms=0.0, dequant_ms=0.0,
                       stall_ms=0.0, link_bytes=0, device_bytes=0, device_peak_bytes=0, blocks=(),
                       predicted_frame_ms=predicted)


def _line(frames, events) -> str:
    out = io.StringIO()
    last = frames[-1].predicted_frame_ms  # the running plan's: the loop's last, where it re-planned
    prediction = Prediction(last, last, 0.0, 0.0, last, 0, {}, 0.0, 0.0)
    snap = TelemetrySnapshot(tuple(frames), (), (), prediction, (), tuple(events))
    report_speed(Console(file=out, width=400), snap, calibrate_hint="calibrate")
    return out.getvalue()


def test_the_loops_re_prediction_is_judged_by_the_frames_after_it():
    # 20 frames at 50 ms predicted 50; the loop then re-predicts 70 ms and 10 frames run at 72 ms
    frames = [_frame(i, 50.0, 50.0) for i in range(1, 21)] + [_frame(i, 72.0, 70.0) for i in range(21, 31)]
    event = LoopEvent(unit=20, kind="replanned", reason="frame 20: slower", measured_ms=72.0, predicted_ms=50.0,
                      new_predicted_ms=70.0, time_s=20.5)
    line = _line(frames, [event])
    assert "the plan predicted 50.0 ms (+0%)" in line
    assert "the closed loop last re-predicted 70.0 ms, and the 10 frames since measured 72.0 ms (+3%)" in line
    assert "hint" not in line  # judged by the latest prediction: within 20 %


def test_without_the_loop_the_plans_prediction_is_the_one_compared():
    line = _line([_frame(i, 60.0, 50.0) for i in range(1, 11)], [])
    assert "measured 60.0 ms per latent frame; the plan predicted 50.0 ms (+20%)" in line
    assert "re-predicted" not in line


def test_a_re_prediction_at_the_very_end_is_not_judged():
    frames = [_frame(i, 50.0, 50.0) for i in range(1, 20)] + [_frame(20, 50.0, 90.0)]
    event = LoopEvent(unit=19, kind="replanned", reason="r", measured_ms=50.0, predicted_ms=50.0,
                      new_predicted_ms=90.0, time_s=19.5)
    assert "the closed loop last re-predicted 90.0 ms, 1 frame before the end" in _line(frames, [event])
