"""Trace files the dashboard replays: the telemetry's Chrome trace, plus the budgets and memory by kind.

read_trace rebuilds a TelemetrySnapshot from the spans by feeding them through the telemetry's own Recorder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from residency.dashboard.context import DashboardContext
from residency.errors import ResidencyError
from residency.plan import Prediction
from residency.telemetry import Recorder, TelemetrySnapshot, chrome_trace

EXTRA_KEY = "residency"  # our section of otherData; Perfetto and chrome://tracing ignore it
SAME_TIME_US = 1e-3  # spans written from the same float mark agree to far better than a nanosecond


def write_trace(snapshot: TelemetrySnapshot, context: DashboardContext, path: str | os.PathLike[str]) -> Path:
    """The Chrome trace of `snapshot` with the context, memory by kind and prediction; atomic."""
    from residency.checkpoint.atomic import atomic_output

    doc = chrome_trace(snapshot)
    doc["otherData"][EXTRA_KEY] = {
        "context": context.to_dict(), "memory": dict(snapshot.memory),
        "prediction": dataclasses.asdict(snapshot.prediction) if snapshot.prediction else None}
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(doc))
    return path


def _bad(path: Path, problem: str) -> ResidencyError:
    return ResidencyError(f"{path}: {problem}",
                          hint="give a trace written by `residency run --trace` or `residency demo`")


def _load(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _bad(path, "no such trace file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _bad(path, f"cannot read it ({getattr(e, 'strerror', None) or e})") from None
    except json.JSONDecodeError as e:
        raise _bad(path, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        raise _bad(path, "not a Chrome trace (no traceEvents list)")
    return doc


def _calls(events: list[dict]):
    """(frame, block, t_start, t_ready, t_dequant, t_end, copy marks | None, link bytes) per call, in order.

    The telemetry writes each call as [copy [, copy-side dequant]] [stall] [compute-side dequant] compute."""
    row: dict[str, Any] = {}
    for e in events:
        if e.get("ph") != "X":
            continue
        track, start_us = e["cat"], float(e["ts"])
        end_us = start_us + float(e["dur"])
        if track == "copy":
            row = {"copy": [start_us, end_us, end_us], "bytes": int(e["args"].get("bytes", 0))}
        elif track == "dequant":
            after_copy = "copy" in row and not row.get("copy_dq") and "stall" not in row
            if after_copy and abs(start_us - row["copy"][1]) < SAME_TIME_US:
                row["copy"][2], row["copy_dq"] = end_us, True
            else:
                row["dequant"] = (start_us, end_us)
        elif track == "stall":
            row["stall"] = (start_us, end_us)
        elif track == "compute":
            t_ready = row["dequant"][0] if "dequant" in row else start_us
            t_start = row["stall"][0] if "stall" in row else t_ready
            copy = tuple(x / 1e6 for x in row["copy"]) if "copy" in row else None
            yield (int(e["args"]["frame"]), e["name"], t_start / 1e6, t_ready / 1e6, start_us / 1e6, end_us / 1e6,
                   copy, row.get("bytes", 0))
            row = {}


def _prediction(extra: dict[str, Any]) -> Prediction | None:
    doc = extra.get("prediction")
    return Prediction(**doc) if isinstance(doc, dict) else None


def read_trace(path: str | os.PathLike[str]) -> tuple[TelemetrySnapshot, DashboardContext]:
    path = Path(path)
    doc = _load(path)
    other = doc.get("otherData") if isinstance(doc.get("otherData"), dict) else {}
    extra = other.get(EXTRA_KEY) if isinstance(other.get(EXTRA_KEY), dict) else {}
    try:
        calls = list(_calls(doc["traceEvents"]))
        counters = [e["args"] for e in doc["traceEvents"] if e.get("ph") == "C" and e.get("name") == "device memory"]
        prediction = _prediction(extra)
        context = DashboardContext.from_dict(extra.get("context") or {"title": path.name})
    except (KeyError, TypeError, ValueError) as e:
        raise _bad(path, f"a malformed event or section ({type(e).__name__}: {e})") from None
    if not calls:
        raise _bad(path, "it holds no recorded frames")
    names = list(dict.fromkeys(c[1] for c in calls))  # first appearance = execution order
    recorder = Recorder(names, prediction)
    index = {n: i for i, n in enumerate(names)}
    frames = [c[0] for c in calls]
    starts = [i for i in range(len(calls)) if i == 0 or frames[i] != frames[i - 1]]
    for k, first in enumerate(starts):
        last = starts[k + 1] if k + 1 < len(starts) else len(calls)
        for frame, name, t0, t1, t2, t3, copy, nbytes in calls[first:last]:
            recorder.record(frame, index[name], t0, t1, t2, t3, copy, nbytes)
        memory = counters[k] if k < len(counters) else {}
        next_start = calls[last][2] if last < len(calls) else None
        recorder.end_frame(lambda marks: np.asarray(marks), int(memory.get("bytes", 0)),
                           int(memory.get("peak_bytes", 0)), next_start)
    predicted_ms = other.get("predicted_frame_ms")
    memory_by_kind = tuple((str(k), int(v)) for k, v in (extra.get("memory") or {}).items())
    if not memory_by_kind and counters:
        memory_by_kind = (("device (all kinds)", int(counters[-1].get("bytes", 0))),)
    snapshot = recorder.snapshot(memory_by_kind)
    if prediction is None and isinstance(predicted_ms, int | float):
        snapshot = dataclasses.replace(snapshot, frames=tuple(
            dataclasses.replace(f, predicted_frame_ms=float(predicted_ms)) for f in snapshot.frames))
    return snapshot, context
