"""Chrome trace JSON (Perfetto, chrome://tracing) of recorded frames: copy, dequant and compute tracks.

A "frame" track holds each frame's work span (its frame_ms), the caller's gap after it in its args (gap_ms);
device memory is a counter track; the file is written atomically (readers never see half a trace). The one
trace writer: the dashboard's trace files are these with a section of their own under otherData.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from residency.atomic_file import atomic_output
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
    TelemetrySnapshot,
)

EXTRA_KEY = "residency"  # our section of otherData; Perfetto and chrome://tracing ignore it
PID = 1
TIDS = {"copy": 1, "dequant": 2, "compute": 3, "stall": 4, "frame": 5}
FRAME_TRACK = "frame"  # one span per frame: the work the plan predicts; the gap to the next one is the caller's


def _span(name: str, track: str, start_s: float, end_s: float, t0: float, args: dict) -> dict:
    return {"name": name, "cat": track, "ph": "X", "pid": PID, "tid": TIDS[track],
            "ts": (start_s - t0) * 1e6, "dur": max(0.0, end_s - start_s) * 1e6, "args": args}


def chrome_trace(snapshot: TelemetrySnapshot) -> dict:
    """The trace document: one complete event ("X") per copy, dequant, compute and stall span, and per frame."""
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
                            t0, {"frame": frame.frame, "gap_ms": frame.gap_ms}))
        events.append({"name": "device memory", "ph": "C", "pid": PID, "ts": (frame.start_s - t0) * 1e6,
                       "args": {"bytes": frame.device_bytes, "peak_bytes": frame.device_peak_bytes}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"predicted_frame_ms": snapshot.prediction.frame_ms if snapshot.prediction else None}}


def write_chrome_trace(snapshot: TelemetrySnapshot, path: str | os.PathLike[str],
                       extra: Mapping[str, Any] | None = None) -> Path:
    """Write the trace document of `snapshot` to `path` atomically and return the path.

    `extra` (JSON-serialisable) goes under otherData[EXTRA_KEY]: the dashboard's context and memory by kind.
    Raises ResidencyError naming the path when it cannot be written.
    """
    doc = chrome_trace(snapshot)
    if extra is not None:
        doc["otherData"][EXTRA_KEY] = dict(extra)
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(doc))
    return path
