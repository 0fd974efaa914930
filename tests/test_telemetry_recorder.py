"""The recorder's frame summary on hand-made marks: per-block and per-frame sums of copy, dequant, compute, stall."""

import pytest

from residency.telemetry.recorder import Recorder


def _identity(marks):
    return marks


def test_frame_summary_sums_each_block_and_the_frame():
    r = Recorder(["a", "b", "c"], None)
    # block a twice: stall 1 ms, dequant 2 ms, compute 3 ms, its copy 4 ms then 0.5 ms of copy-side dequant
    for t in (0.0, 0.010):
        r.record(1, 0, t, t + 0.001, t + 0.003, t + 0.006, (t - 0.005, t - 0.001, t - 0.0005), 1000)
    # block c once, resident: no copy, 2 ms of compute; block b never runs this frame
    r.record(1, 2, 0.020, 0.020, 0.020, 0.022, None, 0)
    r.end_frame(_identity, device_bytes=7, device_peak_bytes=9)
    (frame,) = r.frames
    by_name = {b.block: b for b in frame.blocks}
    assert set(by_name) == {"a", "c"}
    a = by_name["a"]
    assert a.calls == 2 and a.link_bytes == 2000
    assert (a.copy_ms, a.dequant_ms, a.compute_ms, a.stall_ms) == pytest.approx((8.0, 5.0, 6.0, 2.0))
    assert by_name["c"].compute_ms == pytest.approx(2.0) and by_name["c"].copy_ms == 0.0
    assert frame.compute_ms == pytest.approx(8.0) and frame.stall_ms == pytest.approx(2.0)
    assert frame.frame_ms == pytest.approx(22.0) and frame.link_bytes == 2000
    assert (frame.device_bytes, frame.device_peak_bytes) == (7, 9)
    # busy times as the simulator counts them: dequant on the side where it ran
    assert frame.compute_busy_ms == pytest.approx(2 * (2.0 + 3.0) + 2.0)
    assert frame.copy_busy_ms == pytest.approx(2 * (4.0 + 0.5))


def test_an_empty_frame_records_nothing():
    r = Recorder(["a"], None)
    r.end_frame(_identity, 0, 0)
    assert not r.frames
