"""Chrome trace JSON (Perfetto, chrome://tracing) of recorded frames: copy, dequant and compute tracks.

A "frame" track holds each frame's work span (its frame_ms), the caller's gap after it and the running plan's
predictions (frame, compute stream, copy engine) in its args; device memory is a counter track; each decision
of the closed loop (LoopEvent) is a global instant event on the "closed loop" track, named by its kind, its
fields in args. The file is written atomically (readers never see half a trace). The one trace writer: the
dashboard's trace files are these with a section of their own under otherData.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from residency.atomic_file import atomic_output
from residency.telemetry.events import LoopEvent
from residency.telemetry.recorder import (
    BLOCK,
    C_COPIED,
    C_END,
    C_START,
    HAS_COPY,
    LINK_BYTES,
    T_DEQUANT,
    T_END,
    T_READY,
    T_START,
    FrameRecord,
    TelemetrySnapshot,
)

EXTRA_KEY = "residency"  # our section of otherData; Perfetto and chrome://tracing ignore it
PID = 1
TIDS = {"copy": 1, "dequant": 2, "compute": 3, "stall": 4, "frame": 5, "closed loop": 6}
FRAME_TRACK = "frame"  # one span per frame: the work the plan predicts; the gap to the next one is the caller's
LOOP_TRACK = "closed loop"  # one instant event per closed-loop decision (calibrated, replanned, kept, capped)


def _span(name: str, track: str, start_s: float, end_s: float, t0: float, args: dict) -> dict:
    return {"name": name, "cat": track, "ph": "X", "pid": PID, "tid": TIDS[track],
            "ts": (start_s - t0) * 1e6, "dur": max(0.0, end_s - start_s) * 1e6, "args": args}


def _frame_args(frame: FrameRecord) -> dict:
    """The "frame" span's args: the caller's gap and the predictions (ms, null without one) of the plan that ran it."""
    return {"frame": frame.frame, "gap_ms": frame.gap_ms, "predicted_frame_ms": frame.predicted_frame_ms,
            "predicted_compute_ms": frame.predicted_compute_ms, "predicted_copy_ms": frame.predicted_copy_ms}


def _loop_event(event: LoopEvent, t0: float) -> dict:
    """A global instant event ("i", scope "g") at the decision; args hold every field, time_s on the trace's
    clock (seconds from t0, as ts); a non-finite ms (a plan without a prediction) becomes null in chrome_trace."""
    time_s = event.time_s - t0
    args = {**dataclasses.asdict(event), "time_s": time_s}
    return {"name": event.kind, "cat": LOOP_TRACK, "ph": "i", "s": "g", "pid": PID, "tid": TIDS[LOOP_TRACK],
            "ts": time_s * 1e6, "args": args}


def chrome_trace(snapshot: TelemetrySnapshot) -> dict:
    """The trace document: one complete event ("X") per copy, dequant, compute and stall span, and per frame;
    one instant event ("i") per closed-loop decision."""
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": PID, "args": {"name": "residency runtime"}}]
    events += [{"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "args": {"name": track}}
               for track, tid in TIDS.items()]
    starts = [float(rows[0, T_START]) for rows in snapshot.rows if len(rows)]
    t0 = min((*starts, *(f.start_s for f in snapshot.frames)), default=0.0)  # a unit may start before its calls
    for frame, rows in zip(snapshot.frames, snapshot.rows, strict=False):
        for r in rows:
            name = snapshot.block_names[int(r[BLOCK])]
            args = {"frame": frame.frame}
            if r[HAS_COPY] > 0:
                events.append(_span(name, "copy", r[C_START], r[C_COPIED], t0, {**args, "bytes": int(r[LINK_BYTES])}))
                if r[C_END] > r[C_COPIED]:
                    events.append(_span(name, "dequant", r[C_COPIED], r[C_END], t0, args))
            if r[T_READY] > r[T_START]:
                events.append(_span(name, "stall", r[T_START], r[T_READY], t0, args))
            if r[T_DEQUANT] > r[T_READY]:
                events.append(_span(name, "dequant", r[T_READY], r[T_DEQUANT], t0, args))
            events.append(_span(name, "compute", r[T_DEQUANT], r[T_END], t0, args))
        events.append(_span(f"frame {frame.frame}", FRAME_TRACK, frame.start_s, frame.start_s + frame.frame_ms / 1e3,
                            t0, _frame_args(frame)))
        events.append({"name": "device memory", "ph": "C", "pid": PID, "ts": (frame.start_s - t0) * 1e6,
                       "args": {"bytes": frame.device_bytes, "peak_bytes": frame.device_peak_bytes}})
    events += [_loop_event(e, t0) for e in snapshot.events]
    # every non-finite float (an uncomputed figure) as null: JSON has no NaN, and no reader (ours included) takes one
    return _finite({"traceEvents": events, "displayTimeUnit": "ms",
                    "otherData": {"predicted_frame_ms": snapshot.prediction.frame_ms if snapshot.prediction else None}})


def write_chrome_trace(snapshot: TelemetrySnapshot, path: str | os.PathLike[str],
                       extra: Mapping[str, Any] | None = None) -> Path:
    """Write the trace document of `snapshot` to `path` atomically and return the path.

    `extra` (JSON-serialisable) goes under otherData[EXTRA_KEY]: the dashboard's context and memory by kind.
    Raises ResidencyError naming the path when it cannot be written.
    """
    doc = chrome_trace(snapshot)
    if extra is not None:
        doc["otherData"][EXTRA_KEY] = _finite(dict(extra))
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(doc, allow_nan=False))  # a NaN left would raise here, not reach a reader
    return path


def _finite(value: Any) -> Any:
    """`value` with every non-finite float (an uncomputed figure) as None: JSON has no NaN or infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
