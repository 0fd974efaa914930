"""The closed loop on the dashboard: measured ÷ predicted per engine over the frames, re-plans marked, the decisions
listed with their reasons; the Chrome trace carries the decisions and per-frame predictions and reads them back."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from rich.console import Console

from residency import cli
from residency.commands import dashboard_cmd
from residency.dashboard import DashboardContext, build, read_trace, write_trace
from residency.dashboard.panels import REPLAN_MARK, closed_loop
from residency.dashboard.trace_io import replay_prefix
from residency.errors import ResidencyError
from residency.plan import Prediction
from residency.telemetry import Recorder, write_chrome_trace
from residency.telemetry.events import LoopEvent

CONTEXT = DashboardContext("loop · test", frame_budget_ms=60.0)
FRAME_S = 0.050  # each synthetic frame: 20 ms compute call + 30 ms block with a 27 ms copy, then a 10 ms gap
GAP_S = 0.010
SWITCH_AFTER = 4  # frames run under the first plan


def _prediction(frame_ms: float, compute_ms: float, copy_ms: float) -> Prediction:
    return Prediction(frame_ms=frame_ms, first_frame_ms=frame_ms, stall_ms=0.0, copy_ms=copy_ms,
                      compute_ms=compute_ms, link_bytes_per_frame=1000, peak_bytes={"slots": 1},
                      lower_bound_ms=1.0, quality_loss=0.0)


FIRST = _prediction(40.0, 40.0, 10.0)  # the copy engine was profiled 2.7× too fast
SECOND = _prediction(50.0, 50.0, 27.0)  # the re-planned plan, predicted from the calibrated profile
REASON = "frame 4: copy engine 2.7× slower than profiled — re-planned: 1 block now resident-Q8_0, predicted 50.0 ms"


def _synthetic_snapshot(frames: int = 8):
    """Frames 0..frames-1 recorded through a Recorder on seconds marks; the plan switches after SWITCH_AFTER."""
    rec = Recorder(["a", "b"], FIRST)
    t = 1.0  # a backend clock that does not start at 0 (the trace writes times from its first frame)
    for n in range(frames):
        if n == SWITCH_AFTER:
            end_s = t - GAP_S  # a decision is placed at the work end of the frame before it
            rec.add_event(LoopEvent(n, "calibrated", "frame 4: copy engine 2.70× the profile's", 50.0, 40.0, None,
                                    end_s))
            rec.add_event(LoopEvent(n, "replanned", REASON, 50.0, 40.0, 50.0, end_s))
            rec.prediction = SECOND
        rec.record(n, 0, t, t, t, t + 0.020, None, 0)
        rec.record(n, 1, t + 0.020, t + 0.020, t + 0.020, t + FRAME_S, (t + 0.020, t + 0.047, t + 0.047), 1000)
        rec.end_frame(lambda marks: marks, 100, 200, t + FRAME_S + GAP_S)
        t += FRAME_S + GAP_S
    return rec.snapshot((("slots", 100),))


def _render(renderable, width: int = 100) -> str:
    console = Console(record=True, width=width, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


def test_each_frame_keeps_the_predictions_of_the_plan_that_ran_it():
    snap = _synthetic_snapshot()
    before, after = snap.frames[SWITCH_AFTER - 1], snap.frames[SWITCH_AFTER]
    assert (before.predicted_frame_ms, before.predicted_compute_ms, before.predicted_copy_ms) == (40.0, 40.0, 10.0)
    assert (after.predicted_frame_ms, after.predicted_compute_ms, after.predicted_copy_ms) == (50.0, 50.0, 27.0)
    assert after.copy_busy_ms == pytest.approx(27.0) and after.compute_busy_ms == pytest.approx(50.0)
    assert after.period_ms == pytest.approx(60.0)


def test_the_panel_shows_the_ratios_converging_the_replan_and_its_reason():
    text = _render(closed_loop(_synthetic_snapshot(), width_cells=66))
    rows = {line.split()[0]: line for line in text.splitlines() if line.split()}
    # the latest frame ran under the re-planned plan: on prediction everywhere
    assert rows["frame"].rstrip().endswith("1.00×") and rows["copy"].rstrip().endswith("1.00×")
    assert rows["compute"].rstrip().endswith("1.00×")
    # latent frames 1..3 ran under the first plan (copy 2.7×), 4..7 under the second: the mark between them
    copy_cells = rows["copy"].split()[1]
    assert copy_cells.index(REPLAN_MARK) == SWITCH_AFTER - 1
    assert len(set(copy_cells[:SWITCH_AFTER - 1])) == 1 and len(set(copy_cells[SWITCH_AFTER:])) == 1
    assert copy_cells[0] != copy_cells[-1]  # 2.7× and 1.0× are drawn at different heights
    assert REPLAN_MARK in rows["frame"] and REPLAN_MARK in rows["compute"]
    flat = " ".join(text.split())
    assert "[replanned] frame 4: copy engine 2.7× slower than profiled" in flat
    assert "[calibrated] frame 4: copy engine 2.70× the profile's" in flat


def test_the_full_dashboard_includes_the_closed_loop_panel():
    text = _render(build(_synthetic_snapshot(), CONTEXT))
    assert "measured ÷ predicted per frame" in text and "[replanned]" in text


def test_a_panel_without_predictions_or_events_says_so():
    snap = _synthetic_snapshot()
    bare = dataclasses.replace(snap, events=(), frames=tuple(
        dataclasses.replace(f, predicted_frame_ms=None, predicted_compute_ms=None, predicted_copy_ms=None)
        for f in snap.frames))
    text = _render(closed_loop(bare))
    assert "no prediction for these frames" in text and "[" not in text


def test_a_trace_round_trip_keeps_the_events_and_per_engine_predictions(tmp_path):
    snap = _synthetic_snapshot()
    got, _ = read_trace(write_trace(snap, CONTEXT, tmp_path / "t.json"))
    assert got.prediction == SECOND
    for a, b in zip(got.frames, snap.frames, strict=True):
        assert (a.predicted_frame_ms, a.predicted_compute_ms, a.predicted_copy_ms) == (
            b.predicted_frame_ms, b.predicted_compute_ms, b.predicted_copy_ms)
        assert a.gap_ms == pytest.approx(b.gap_ms, abs=1e-6)
    t0 = snap.frames[0].start_s  # the trace's clock starts at its first frame
    assert len(got.events) == 2
    for a, b in zip(got.events, snap.events, strict=True):
        assert dataclasses.replace(a, time_s=0.0) == dataclasses.replace(b, time_s=0.0)
        assert a.time_s == pytest.approx(b.time_s - t0, abs=1e-9)
    # the same ratios and reasons render from the trace as from the live snapshot
    assert _render(closed_loop(got)) == _render(closed_loop(snap))


def test_a_re_predicted_plan_without_its_lower_bound_writes_a_trace_the_dashboard_reads(tmp_path, capsys):
    """The closed loop re-predicts the running plan without its bound (NaN): the trace holds null, never NaN, and
    `residency dashboard` replays it (it had refused the demo's own trace: "the trace holds NaN")."""
    snap = dataclasses.replace(_synthetic_snapshot(), prediction=dataclasses.replace(SECOND, lower_bound_ms=math.nan))
    path = write_trace(snap, CONTEXT, tmp_path / "t.json")
    text = path.read_text()
    assert "NaN" not in text and json.loads(text)["otherData"]["residency"]["prediction"]["lower_bound_ms"] is None
    got, _ = read_trace(path)
    assert math.isnan(got.prediction.lower_bound_ms)
    assert dataclasses.replace(got.prediction, lower_bound_ms=1.0) == SECOND
    assert cli.main(["dashboard", str(path), "--once"]) == 0


def test_the_trace_holds_each_decision_as_a_global_instant_event(tmp_path):
    doc = json.loads(write_chrome_trace(_synthetic_snapshot(), tmp_path / "t.json").read_text())
    instants = [e for e in doc["traceEvents"] if e.get("ph") == "i"]
    assert [e["name"] for e in instants] == ["calibrated", "replanned"]
    e = instants[1]
    assert e["s"] == "g" and e["cat"] == "closed loop" and e["args"]["reason"] == REASON
    assert set(e["args"]) == {f.name for f in dataclasses.fields(LoopEvent)}
    names = {x["args"]["name"] for x in doc["traceEvents"] if x.get("name") == "thread_name"}
    assert "closed loop" in names


def test_a_plain_trace_keeps_per_frame_predictions_across_the_switch(tmp_path):
    got, _ = read_trace(write_chrome_trace(_synthetic_snapshot(), tmp_path / "plain.json"))
    assert got.prediction is None
    assert [f.predicted_copy_ms for f in got.frames] == [10.0] * SWITCH_AFTER + [27.0] * SWITCH_AFTER


def _loop_event_index(doc: dict) -> int:
    return next(i for i, e in enumerate(doc["traceEvents"]) if e.get("ph") == "i" and e["name"] == "replanned")


@pytest.mark.parametrize("field,value", [("kind", "exploded"), ("unit", -1), ("reason", 5), ("measured_ms", "1 ms"),
                                         ("predicted_ms", -3.0), ("new_predicted_ms", [1])])
def test_a_malformed_event_is_refused_naming_the_field(tmp_path, field, value):
    path = write_trace(_synthetic_snapshot(), CONTEXT, tmp_path / "t.json")
    doc = json.loads(path.read_text())
    i = _loop_event_index(doc)
    doc["traceEvents"][i]["args"][field] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(ResidencyError, match=rf"traceEvents\[{i}\]\.args\.{field}") as err:
        read_trace(path)
    assert err.value.hint


def test_an_event_missing_a_field_or_its_time_is_refused(tmp_path):
    path = write_trace(_synthetic_snapshot(), CONTEXT, tmp_path / "t.json")
    doc = json.loads(path.read_text())
    i = _loop_event_index(doc)
    del doc["traceEvents"][i]["args"]["reason"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ResidencyError, match=rf"missing field 'traceEvents\[{i}\]\.args\.reason'"):
        read_trace(path)
    doc["traceEvents"][i]["args"]["reason"] = REASON
    doc["traceEvents"][i]["ts"] = "later"
    path.write_text(json.dumps(doc))
    with pytest.raises(ResidencyError, match=rf"traceEvents\[{i}\]\.ts"):
        read_trace(path)


def test_an_older_trace_without_events_or_frame_predictions_still_loads(tmp_path):
    path = write_trace(_synthetic_snapshot(), CONTEXT, tmp_path / "t.json")
    doc = json.loads(path.read_text())
    doc["traceEvents"] = [e for e in doc["traceEvents"] if e.get("ph") != "i"]
    for e in doc["traceEvents"]:
        if e.get("cat") == "frame":
            e["args"] = {"frame": e["args"]["frame"], "gap_ms": e["args"]["gap_ms"]}
    path.write_text(json.dumps(doc))
    got, _ = read_trace(path)
    assert got.events == ()
    # without per-frame figures every frame takes the trace's one prediction, as before
    assert {(f.predicted_frame_ms, f.predicted_compute_ms, f.predicted_copy_ms) for f in got.frames} == {
        (50.0, 50.0, 27.0)}
    assert "measured ÷ predicted" in _render(build(got, CONTEXT))


def test_a_replay_shows_each_event_once_it_reaches_its_frame(tmp_path):
    got, _ = read_trace(write_trace(_synthetic_snapshot(), CONTEXT, tmp_path / "t.json"))
    assert replay_prefix(got, SWITCH_AFTER - 1).events == ()
    assert [e.kind for e in replay_prefix(got, SWITCH_AFTER).events] == ["calibrated", "replanned"]
    last = replay_prefix(got, len(got.frames))
    assert last.frames == got.frames and last.events == got.events


def test_the_replay_is_paced_by_each_frame_period(monkeypatch):
    snap = _synthetic_snapshot(3)
    slept: list[float] = []
    shown: list[int] = []
    monkeypatch.setattr(dashboard_cmd.time, "sleep", slept.append)

    class Board:
        def update(self, s):
            shown.append(len(s.frames))

    dashboard_cmd.replay(Board(), snap, speed=2.0)
    assert shown == [1, 2, 3]
    # work 50 ms + the caller's gap 10 ms, at twice the recorded speed
    assert slept == pytest.approx([0.030, 0.030, 0.030])


def test_a_replan_mark_takes_a_frame_cell_and_the_rows_keep_their_width():
    snap = _synthetic_snapshot(60)
    frames = snap.frames[:50]  # latent frames 1..49: as many as the row has cells, the switch among them
    rows = [line for line in _render(closed_loop(dataclasses.replace(snap, frames=frames), width_cells=66),
                                     width=66).splitlines() if line.startswith(("frame ", "compute ", "copy "))]
    assert len(rows) == 3
    assert all(len(line.rstrip()) == 66 and REPLAN_MARK in line for line in rows)


def test_a_panel_with_more_decisions_than_it_lists_says_how_many_it_shows():
    """"closed loop: 4 decisions, latest last" listed 3, the first dropped without a word."""
    from residency.dashboard.panels import EVENTS_SHOWN

    snap = _synthetic_snapshot()
    extra = tuple(LoopEvent(n, "calibrated", f"frame {n}: fitted", 50.0, 40.0, None, 1.0 + n * 0.06) for n in (1, 2))
    many = dataclasses.replace(snap, events=extra + tuple(snap.events))
    flat = " ".join(_render(closed_loop(many, width_cells=66)).split())
    assert f"closed loop: {len(many.events)} decisions, the latest {EVENTS_SHOWN}, last at the bottom" in flat
    assert "frame 1: fitted" not in flat
    assert "closed loop: 2 decisions, latest last" in " ".join(_render(closed_loop(snap, width_cells=66)).split())
