"""Trace files the dashboard replays: the telemetry's Chrome trace, plus the budgets and memory by kind.

read_trace rebuilds a TelemetrySnapshot from the spans by feeding them through the telemetry's own Recorder,
then sets each frame's work time, caller gap and predictions from its "frame" span (traces written before those
spans existed keep the Recorder's figures for calls alone: first call .. last call, the rest to the next frame a
gap; before the per-frame predictions, every frame gets the trace's one prediction). The closed loop's decisions
come back from their instant events (none in older traces).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from residency.dashboard.context import DashboardContext
from residency.errors import ResidencyError
from residency.jsonfile import read_json
from residency.plan.plan import MAX_PLAN_BYTES
from residency.plan.plan_io import prediction_from_dict, prediction_to_dict
from residency.simulate.memory import LEDGER_KINDS
from residency.telemetry import FrameRecord, Recorder, TelemetrySnapshot
from residency.telemetry.chrome_trace import EXTRA_KEY, FRAME_TRACK, LOOP_TRACK, write_chrome_trace
from residency.telemetry.events import EVENT_KINDS, LoopEvent
from residency.userpath import FILE, MISSING, path_kind
from residency.validate import Reader, at, document_kind, show, use_of
from residency.workload.catalog import MAX_VIDEO_FRAMES_PER_LATENT

SAME_TIME_US = 1e-3  # spans written from the same float mark agree to far better than a nanosecond
SAME_TIME_S = 1e-6  # an event placed at a frame's work end reads back within float rounding of it (~1e-15 s)
MAX_EVENT_UNIT = 1 << 62  # units of work before an event: any count a run can reach
PREDICTED_FIELDS = ("predicted_frame_ms", "predicted_compute_ms", "predicted_copy_ms")  # frame span args, ms

# The memory section of a trace that has none of its own: the device total from its last counter event.
ALL_KINDS = "device (all kinds)"


def write_trace(snapshot: TelemetrySnapshot, context: DashboardContext, path: str | os.PathLike[str]) -> Path:
    """The Chrome trace of `snapshot` with the context, memory by kind and prediction; atomic."""
    return write_chrome_trace(snapshot, path, extra={
        "context": context.to_dict(), "memory": dict(snapshot.memory),
        "prediction": prediction_to_dict(snapshot.prediction) if snapshot.prediction else None})


MAX_TRACE_BYTES = 256 << 20  # a 1,500-frame rollout of a 22-block model writes ~40 MB
TRACKS = ("copy", "dequant", "stall", "compute")  # the categories of the telemetry's complete ("X") events
_HINT = "give a trace written by `residency run --trace` or `residency demo`"
_CONTEXT_KNOWN = tuple(f.name for f in dataclasses.fields(DashboardContext))


def _starts_with(path: str | os.PathLike[str], prefix: bytes) -> bool:
    """Whether a regular file begins with `prefix` (after white space); False for anything else."""
    if path_kind(path)[0] != FILE:
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4096).lstrip().startswith(prefix)
    except OSError:
        return False


def _load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The trace as the object form: {"traceEvents": [...], "otherData": {...}}. Chrome's other form, a bare
    array of events (what some tools re-export a trace as), reads as that object with no otherData, so it
    replays without the context, memory by kind and prediction the object form carries; errors then name
    its events traceEvents[i] all the same."""
    if path_kind(path)[0] == MISSING:
        raise ResidencyError(f"{path}: no such trace file", hint=_HINT)
    try:
        doc = read_json(path, "the trace", _HINT, max_bytes=MAX_TRACE_BYTES)
    except ResidencyError as e:  # a cut JSON-array trace (a run killed while writing one) is said to be one
        cut = "not valid JSON" in e.message and _starts_with(path, b"[")
        raise ResidencyError(e.message, hint=e.hint + (" (a JSON-array trace must end with its ']')" if cut else "")
                             ) from None
    if isinstance(doc, list):
        doc = {"traceEvents": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        kind = document_kind(doc)
        if kind is not None and "trace" not in kind:
            raise ResidencyError(f"{path}: this is {kind}, not a trace", hint=f"{use_of(kind)}; {_HINT}"
                                 if use_of(kind) else _HINT)
        raise ResidencyError(f"{path}: not a Chrome trace (neither a traceEvents list nor an array of events)",
                             hint=_HINT)
    return doc


# Times and durations in a trace are µs: 1e14 is three years. 1e300 was read, and the dashboard printed a
# 300-digit frame time.
MAX_TRACE_US = 1e14


def _number(r: Reader, e: dict, key: str, path: str, minimum: float | None = None) -> float:
    """e[key] as a finite float ≥ minimum; the common case costs two type tests, the rest goes to the Reader."""
    if key not in e:
        raise r.missing(at(path, key))
    v = e[key]
    if (type(v) is float or type(v) is int) and -MAX_TRACE_US < v < MAX_TRACE_US and (minimum is None or v >= minimum):
        return float(v)
    return r.number(v, at(path, key), minimum, maximum=MAX_TRACE_US)


def _count(r: Reader, args: dict, key: str, path: str, default: int | None = None) -> int:
    if key not in args and default is not None:
        return default
    v = args[key] if key in args else None
    if type(v) is int and 0 <= v <= MAX_PLAN_BYTES:
        return v
    if key not in args:
        raise r.missing(at(path, key))
    return r.integer(v, at(path, key), 0, MAX_PLAN_BYTES)


def _calls(r: Reader, events: list):
    """(frame, block, t_start, t_ready, t_dequant, t_end, copy marks | None, link bytes) per call, in order.

    The telemetry writes each call as [copy [, copy-side dequant]] [stall] [compute-side dequant] compute.
    Every field used is checked here, so a hand-edited or truncated trace fails naming the event. A call's events
    are read in the order written (a prefetched copy starts before the compute ahead of it ends, so they cannot be
    re-sorted by time): compute events out of time order are refused (reversed, the replay drew negative times)."""
    row: dict[str, Any] = {}
    last_compute_us = -math.inf
    for i, e in enumerate(events):
        path = f"traceEvents[{i}]"
        if not isinstance(e, dict):
            raise r.bad(path, e, "an event (a JSON object)")
        if e.get("ph") != "X" or e.get("cat") == FRAME_TRACK:
            continue
        if e.get("cat") not in TRACKS:  # another program's events (a browser's, a profiler's)
            raise ResidencyError(f"{r.source}: {path} is not an event residency writes (its cat is "
                                 f"{e.get('cat')!r}, not one of {', '.join(TRACKS)}): not a residency trace",
                                 hint=_HINT)
        track = e["cat"]
        name = r.string(r.need(e, "name", path), f"{path}.name", non_empty=True)
        start_us = _number(r, e, "ts", path)
        end_us = start_us + _number(r, e, "dur", path, minimum=0.0)
        args = r.obj(r.need(e, "args", path), f"{path}.args")
        if track == "copy":
            row = {"copy": [start_us, end_us, end_us], "bytes": _count(r, args, "bytes", f"{path}.args", 0)}
        elif track == "dequant":
            after_copy = "copy" in row and not row.get("copy_dq") and "stall" not in row
            if after_copy and abs(start_us - row["copy"][1]) < SAME_TIME_US:
                row["copy"][2], row["copy_dq"] = end_us, True
            else:
                row["dequant"] = (start_us, end_us)
        elif track == "stall":
            row["stall"] = (start_us, end_us)
        else:
            if start_us < last_compute_us:
                raise ResidencyError(f"{r.source}: {path} (compute of {name}) starts before the compute event ahead of "
                                     "it: the events are not in the order residency writes them (sorted or edited?)",
                                     hint="replay the trace as `residency run --trace` wrote it")
            last_compute_us = start_us
            frame = _count(r, args, "frame", f"{path}.args")
            t_ready = row["dequant"][0] if "dequant" in row else start_us
            t_start = row["stall"][0] if "stall" in row else t_ready
            copy = tuple(x / 1e6 for x in row["copy"]) if "copy" in row else None
            yield (frame, name, t_start / 1e6, t_ready / 1e6, start_us / 1e6, end_us / 1e6, copy, row.get("bytes", 0))
            row = {}


def _frame_spans(r: Reader, events: list) -> list[tuple[int, dict[str, Any]]]:
    """(frame, FrameRecord fields to set) of each "frame" span, in order: start_s, frame_ms, gap_ms, and the
    predictions its args hold (ms or null; absent in older traces, which keep the Recorder's). None in traces
    older than the spans."""
    out = []
    for i, e in enumerate(events):
        if isinstance(e, dict) and e.get("ph") == "X" and e.get("cat") == FRAME_TRACK:
            path = f"traceEvents[{i}]"
            args = r.obj(r.need(e, "args", path), f"{path}.args")
            fields = {"start_s": _number(r, e, "ts", path) / 1e6,
                      "frame_ms": _number(r, e, "dur", path, minimum=0.0) / 1e3,
                      "gap_ms": r.number(args.get("gap_ms", 0.0), f"{path}.args.gap_ms", 0.0, maximum=1e300,
                                         unit="ms")}
            for key in PREDICTED_FIELDS:
                if key in args:
                    fields[key] = _optional_ms(r, args[key], f"{path}.args.{key}")
            out.append((_count(r, args, "frame", f"{path}.args"), fields))
    return out


def _optional_ms(r: Reader, value: Any, path: str) -> float | None:
    """`value` as ms ≥ 0, or None for null; raises ResidencyError naming `path` otherwise."""
    return None if value is None else r.number(value, path, 0.0, maximum=1e300, unit="ms")


def _with_frame_spans(frames: tuple[FrameRecord, ...], spans: list[tuple[int, dict[str, Any]]]
                      ) -> tuple[FrameRecord, ...]:
    """`frames` with the fields of their spans, matched by frame number from the newest back (the Recorder
    keeps the newest frames; a recovery restarts the numbers); a frame without a span keeps the Recorder's."""
    out, k = [], len(spans)
    for f in reversed(frames):
        j = next((j for j in range(k - 1, -1, -1) if spans[j][0] == f.frame), None)
        if j is None:
            out.append(f)
            continue
        out.append(dataclasses.replace(f, **spans[j][1]))
        k = j
    return tuple(reversed(out))


def _loop_events(r: Reader, events: list) -> tuple[LoopEvent, ...]:
    """The closed loop's decisions from their instant events, in order; time_s from ts (the frames' clock)."""
    out = []
    for i, e in enumerate(events):
        if not (isinstance(e, dict) and e.get("ph") == "i" and e.get("cat") == LOOP_TRACK):
            continue
        path = f"traceEvents[{i}]"
        args = r.obj(r.need(e, "args", path), f"{path}.args")
        where = f"{path}.args"
        measured, predicted = (_optional_ms(r, r.need(args, k, where), at(where, k))
                               for k in ("measured_ms", "predicted_ms"))
        out.append(LoopEvent(
            unit=r.integer(r.need(args, "unit", where), at(where, "unit"), 0, MAX_EVENT_UNIT),
            kind=r.choice(r.need(args, "kind", where), at(where, "kind"), EVENT_KINDS),
            reason=r.string(r.need(args, "reason", where), at(where, "reason")),
            measured_ms=math.nan if measured is None else measured,  # written as null when it was NaN
            predicted_ms=math.nan if predicted is None else predicted,
            new_predicted_ms=_optional_ms(r, args.get("new_predicted_ms"), at(where, "new_predicted_ms")),
            time_s=_number(r, e, "ts", path) / 1e6))
    return tuple(out)


def replay_prefix(snapshot: TelemetrySnapshot, n: int) -> TelemetrySnapshot:
    """`snapshot` as it stood after its first `n` frames: those frames and rows, and the events decided by the
    end of the n-th frame's work (an event is placed at the work end of the last frame before it)."""
    frames = snapshot.frames[:n]
    end_s = frames[-1].start_s + frames[-1].frame_ms / 1e3 if frames else -math.inf
    events = tuple(e for e in snapshot.events if e.time_s <= end_s + SAME_TIME_S)
    return dataclasses.replace(snapshot, frames=frames, rows=snapshot.rows[:n], events=events)


def _counters(r: Reader, events: list) -> list[tuple[int, int]]:
    """(device bytes, peak bytes) of each "device memory" counter event, in order."""
    out = []
    for i, e in enumerate(events):
        if isinstance(e, dict) and e.get("ph") == "C" and e.get("name") == "device memory":
            args = r.obj(r.need(e, "args", f"traceEvents[{i}]"), f"traceEvents[{i}].args")
            out.append((_count(r, args, "bytes", f"traceEvents[{i}].args", 0),
                        _count(r, args, "peak_bytes", f"traceEvents[{i}].args", 0)))
    return out


def _context(r: Reader, value: Any, default_title: str) -> DashboardContext:
    if value is None:
        return DashboardContext(default_title)
    path = f"otherData.{EXTRA_KEY}.context"
    doc = r.obj(value, path, _CONTEXT_KNOWN, required=("title",))
    vram = doc.get("vram_budget_bytes")
    frame_ms = doc.get("frame_budget_ms")
    return DashboardContext(
        title=r.string(doc["title"], f"{path}.title"),
        vram_budget_bytes=None if vram is None else r.integer(vram, f"{path}.vram_budget_bytes", 1, MAX_PLAN_BYTES,
                                                              unit="bytes"),
        frame_budget_ms=None if frame_ms is None else r.number(frame_ms, f"{path}.frame_budget_ms", 0.0,
                                                               strict=True, unit="ms"),
        video_frames_per_latent=r.integer(doc.get("video_frames_per_latent", 1), f"{path}.video_frames_per_latent",
                                          1, MAX_VIDEO_FRAMES_PER_LATENT),
        predicted_for=None if doc.get("predicted_for") is None else r.string(doc["predicted_for"],
                                                                               f"{path}.predicted_for"))


def _memory_kind(r: Reader, kind: str) -> str:
    """A kind of the memory section: one the ledger accounts, or the total a plain trace's counters give."""
    if kind not in (*LEDGER_KINDS, ALL_KINDS):
        raise ResidencyError(f"{r.source}: otherData.{EXTRA_KEY}.memory names an unknown kind {show(kind)}",
                             hint=f"the kinds are {', '.join(LEDGER_KINDS)}; a trace written by `run --trace` or "
                                  "`demo` holds only those")
    return kind


def read_trace(path: str | os.PathLike[str]) -> tuple[TelemetrySnapshot, DashboardContext]:
    """The telemetry and dashboard context stored in a Chrome trace written by write_trace.

    Raises ResidencyError when the file is missing, is not a trace, holds no recorded frame, or a value
    is out of range (the message names its JSON path). Cost: reads and re-records the whole file.
    """
    doc = _load(path)
    r = Reader(str(path), _HINT)
    other = r.obj(doc.get("otherData", {}), "otherData")
    extra = r.obj(other.get(EXTRA_KEY, {}), f"otherData.{EXTRA_KEY}")
    calls = list(_calls(r, doc["traceEvents"]))
    counters = _counters(r, doc["traceEvents"])
    raw_prediction = extra.get("prediction")
    prediction = (None if raw_prediction is None
                  else prediction_from_dict(r, raw_prediction, f"otherData.{EXTRA_KEY}.prediction"))
    context = _context(r, extra.get("context"), Path(path).name)
    memory = r.obj(extra.get("memory", {}), f"otherData.{EXTRA_KEY}.memory")
    memory_by_kind = tuple((_memory_kind(r, k), r.integer(v, f"otherData.{EXTRA_KEY}.memory.{k}", 0, MAX_PLAN_BYTES,
                                                          unit="bytes"))
                           for k, v in memory.items())
    predicted_ms = other.get("predicted_frame_ms")
    if predicted_ms is not None:
        predicted_ms = r.number(predicted_ms, "otherData.predicted_frame_ms", 0.0, strict=True, unit="ms")
    if not calls:
        raise ResidencyError(f"{path}: it holds no recorded frames", hint=_HINT)
    names = list(dict.fromkeys(c[1] for c in calls))  # first appearance = execution order
    recorder = Recorder(names, prediction)
    index = {n: i for i, n in enumerate(names)}
    frames = [c[0] for c in calls]
    starts = [i for i in range(len(calls)) if i == 0 or frames[i] != frames[i - 1]]
    for k, first in enumerate(starts):
        last = starts[k + 1] if k + 1 < len(starts) else len(calls)
        for frame, name, t0, t1, t2, t3, copy, nbytes in calls[first:last]:
            recorder.record(frame, index[name], t0, t1, t2, t3, copy, nbytes)
        device_bytes, peak_bytes = counters[k] if k < len(counters) else (0, 0)
        next_start = calls[last][2] if last < len(calls) else None
        recorder.end_frame(lambda marks: np.asarray(marks), device_bytes, peak_bytes, next_start)
    if not memory_by_kind and counters:
        memory_by_kind = ((ALL_KINDS, counters[-1][0]),)
    snapshot = recorder.snapshot(memory_by_kind)
    frames = snapshot.frames
    if prediction is None and predicted_ms is not None:  # a plain trace: its one figure, unless a span has its own
        frames = tuple(dataclasses.replace(f, predicted_frame_ms=predicted_ms) for f in frames)
    frames = _with_frame_spans(frames, _frame_spans(r, doc["traceEvents"]))
    return dataclasses.replace(snapshot, frames=frames, events=_loop_events(r, doc["traceEvents"])), context
