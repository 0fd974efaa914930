"""The recorder: one row of raw timestamp marks per block call, closed into one array per latent frame.

An open frame's rows are tuples in a bounded deque; at frame end they become one array and their marks are
resolved to seconds (GPU: CUDA events); a frame's summary (FrameRecord) is made when `frames` is read.

Beside the calls it takes the start and end marks of each unit of work (a session's step, or one call of
the model): a frame's measured time is the span of its units (the work the plan predicts), and the caller's
time between one frame's work and the next is kept apart as the frame's gap.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from residency.plan import Prediction
from residency.telemetry.events import LoopEvent

# Columns of a call row. t_*: compute-side marks; c_*: the copy engine's marks for the call's load.
FRAME, BLOCK, T_START, T_READY, T_DEQUANT, T_END, C_START, C_COPIED, C_END, LINK_BYTES, HAS_COPY = range(11)
COLUMNS = 11
RING_CALLS = 1 << 15  # calls kept of one open frame (a world-model frame makes ~40–200; beyond, the oldest go)
KEEP_FRAMES = 256  # frame records (and resolved rows, for traces) kept


@dataclass(frozen=True)
class BlockTiming:
    """Measured times of one block within one frame (ms, summed over its calls) and bytes it loaded."""
    block: str
    calls: int
    copy_ms: float  # copy-engine time of this block's loads (host->device bytes)
    dequant_ms: float  # dequantization, on the copy engine or before the call on the compute side
    compute_ms: float  # the block's forward (its own dequant excluded)
    stall_ms: float  # compute waiting for a load that had not landed
    link_bytes: int


@dataclass(frozen=True)
class FrameRecord:
    """Measured totals of one frame (ms, bytes) with its per-block timings and the prediction."""
    frame: int  # 0 = session start, 1.. = latent frames
    start_s: float  # the frame's work start (its first unit of work, else its first call), backend clock
    # The work the plan predicts: first unit start .. last unit end of the units running this frame's calls
    # (clipped at the frame's first call / the next frame's first call where one unit runs several frames);
    # a frame whose calls ran outside any unit: its first call's start .. its last call's end.
    frame_ms: float
    compute_ms: float
    copy_ms: float
    dequant_ms: float
    stall_ms: float
    link_bytes: int
    device_bytes: int  # ledger total at the frame's end
    device_peak_bytes: int  # ledger high-water mark so far
    blocks: tuple[BlockTiming, ...]
    predicted_frame_ms: float | None  # the plan's steady-frame prediction, when it has one
    # busy times as the simulator predicts them: compute stream = dequant on compute + compute; copy engine =
    # copies + dequant on the copy engine (compute_ms/copy_ms above leave dequant out, dequant_ms has both)
    compute_busy_ms: float = 0.0
    copy_busy_ms: float = 0.0
    # The caller's time from this frame's work end to the next frame's work (drawing, pacing, I/O between
    # steps): never in frame_ms; 0.0 where unknown (the frame closed at detach).
    gap_ms: float = 0.0
    # The running plan's per-engine predictions for this frame (Prediction.compute_ms / copy_ms, ms), the
    # counterparts of compute_busy_ms / copy_busy_ms; None without a prediction (or from an older trace).
    predicted_compute_ms: float | None = None
    predicted_copy_ms: float | None = None
    # Cached latent frames the frame's attention read, as its session said (RecoverableSession.kv_frames, when the
    # frame ran in Runtime.step); None where unknown: a frame taken at the full window after the first.
    kv_frames: int | None = None

    @property
    def period_ms(self) -> float:
        """ms from this frame's work start to the next frame's: frame_ms + gap_ms."""
        return self.frame_ms + self.gap_ms


@dataclass(frozen=True)
class TelemetrySnapshot:
    """An immutable copy of the recorder's kept frames, their call rows and the ledger's bytes."""
    frames: tuple[FrameRecord, ...]  # oldest first
    rows: tuple[np.ndarray, ...]  # resolved call rows per kept frame (seconds), read-only
    block_names: tuple[str, ...]
    prediction: Prediction | None
    memory: tuple[tuple[str, int], ...]  # ledger bytes by kind at the snapshot
    events: tuple[LoopEvent, ...] = ()  # the closed loop's decisions (calibrations, re-plans), oldest first

    def with_frames(self, kept: Sequence[tuple[FrameRecord, np.ndarray]]) -> TelemetrySnapshot:
        """This snapshot holding only the `kept` (frame, call rows) pairs (a calibration's window)."""
        return dataclasses.replace(self, frames=tuple(f for f, _ in kept), rows=tuple(r for _, r in kept))

    def steady_frame_ms(self, skip: int = 2) -> float:
        """Median measured work ms (frame_ms) of latent frames after the first `skip`; nan with none."""
        return median_or_nan(f.frame_ms for f in self.frames if f.frame > skip)

    def steady_gap_ms(self, skip: int = 2) -> float:
        """Median caller gap ms (gap_ms) of latent frames after the first `skip`, a last gap unknown left out
        (known_gaps); nan with none."""
        return median_or_nan(known_gaps([f for f in self.frames if f.frame > skip]))


def known_gaps(frames: Sequence[FrameRecord]) -> list[float]:
    """gap_ms of `frames` (oldest first); the newest is left out when 0.0, its gap unknown (closed at detach)."""
    gaps = [f.gap_ms for f in frames]
    return gaps[:-1] if gaps and gaps[-1] == 0.0 else gaps


def median_or_nan(values: Iterable[float]) -> float:
    """statistics.median of `values`, nan with none: the steady figures and the dashboard's panels take this one
    median (an upper median here read 59.5 where the panels showed 55.0)."""
    values = list(values)
    return statistics.median(values) if values else float("nan")


class Recorder:
    """Keeps the timestamps of every block call and sums them per frame (the last KEEP_FRAMES frames).

    record() runs on the compute thread on every call: it only appends a tuple (~0.1 us). unit_start() and
    unit_end() run once per unit of work (a step, a call of the model): two attribute writes each.
    """
    def __init__(self, block_names: list[str], prediction: Prediction | None):
        self.block_names = tuple(block_names)
        self.prediction = prediction
        # The open frame's rows as tuples: an append costs ~0.1 µs where six scalar writes into a numpy row
        # cost ~5 µs (per call, on the compute thread); a frame's rows become one array at its end.
        self._open: deque[tuple] = deque(maxlen=RING_CALLS)
        # closed frames' records with their resolved rows, in one deque: two appended apart came apart when a Ctrl-C
        # landed between the appends (a snapshot's frames and rows then differed in length)
        self._closed: deque[tuple[FrameRecord, np.ndarray]] = deque(maxlen=KEEP_FRAMES)
        self._unsummarised: deque[tuple] = deque(maxlen=KEEP_FRAMES)  # closed frames' rows, not yet summarised
        # Units of work since the last frame end, as unresolved marks (resolved at the next frame end, before
        # the GPU's event pool reuses them): the first one's start, the last finished one's end, and the start
        # of the one in progress (None when it began before the last frame end: its start is already spent).
        self._first_unit_start: float | None = None
        self._last_unit_end: float | None = None
        self._open_unit_start: float | None = None
        self._in_unit = False
        self._carry_start_s: float | None = None  # the open frame's work start, fixed at the last frame end
        self.closed_frames = 0  # frames closed since the recorder was made (the deques keep the last ones)
        self.last_frame = 0  # the number of the last frame closed (0 before any): a new plan's frames follow it
        self._events: deque[LoopEvent] = deque(maxlen=KEEP_FRAMES)
        # The KV frames the step in progress reads (Runtime.step sets it from its session; None outside a step),
        # taken by each frame number at its first call: a frame closes only at the next frame's first call.
        self.kv_frames: int | None = None
        self._kv_of: dict[int, int | None] = {}
        self._kv_frame = -1
        # Marks that are seconds already (the CPU backend's perf_counter): a frame whose calls are done is closed when
        # telemetry is read (close_done_frame), not only at the next frame's first call, and its gap is filled in
        # when the next unit starts. A GPU's marks are events: resolving them at once would wait for the device.
        self.eager_close = False
        self._gap_from_s: float | None = None  # the work end of a frame closed at its unit's end, gap not known yet

    def record(self, frame: int, block: int, t_start: float, t_ready: float, t_dequant: float, t_end: float,
               copy: tuple[float, float, float] | None, link_bytes: int) -> None:
        """Append one call's marks (backend clock units) and, for a load, its copy marks and bytes.

        `block` is the block's index in block_names; `copy` is (start, copied, end) or None without a load.
        """
        if frame != self._kv_frame:  # the frame's first call: the KV frames its step reads
            self._kv_frame = frame
            self._kv_of[frame] = self.kv_frames
            if len(self._kv_of) > 4:  # end_frame keeps it to the open frame's; one cut short by Ctrl-C left its own
                self._kv_of = {f: v for f, v in self._kv_of.items() if f >= frame - 1}
        if copy is None:
            self._open.append((frame, block, t_start, t_ready, t_dequant, t_end, 0.0, 0.0, 0.0, 0, 0.0))
        else:
            self._open.append((frame, block, t_start, t_ready, t_dequant, t_end, *copy, link_bytes, 1.0))

    def unit_start(self, mark: float) -> None:
        """A unit of work (a step, a call of the model) begins at clock `mark`; units never overlap."""
        if self._gap_from_s is not None:  # the caller's time since the frame closed at its unit's end (mark: seconds)
            self._set_last_gap(max(0.0, mark - self._gap_from_s))
            self._gap_from_s = None
        self._in_unit, self._open_unit_start = True, mark
        if self._first_unit_start is None:
            self._first_unit_start = mark

    def unit_end(self, mark: float) -> None:
        """The unit of work in progress ended at clock `mark`."""
        if self._in_unit:
            self._in_unit, self._open_unit_start, self._last_unit_end = False, None, mark

    def close_done_frame(self, resolve: Callable[[np.ndarray], np.ndarray], device_bytes: int,
                          device_peak_bytes: int) -> None:
        """The last unit (unit_end) finished a frame's calls: close its record now, so that telemetry read after a call
        or a step has it (the next unit's start gives its gap). Only where marks are seconds (eager_close)."""
        closed = self.closed_frames
        self.end_frame(resolve, device_bytes, device_peak_bytes)
        if self.closed_frames > closed:
            self._gap_from_s = self._unsummarised[-1][-2]  # its work end (seconds)

    def _set_last_gap(self, gap_s: float) -> None:
        """The gap of the frame closed last, summarised or not yet."""
        if self._unsummarised:
            self._unsummarised[-1] = (*self._unsummarised[-1][:-1], gap_s)
        elif self._closed:
            record, rows = self._closed[-1]
            self._closed[-1] = (dataclasses.replace(record, gap_ms=gap_s * 1e3), rows)

    def unit_discard(self) -> None:
        """The unit in progress failed (or its model was detached during it): its marks are dropped."""
        if self._in_unit and self._last_unit_end is None:
            self._first_unit_start = None  # it was the only unit since the last frame end
        self._in_unit, self._open_unit_start = False, None

    def end_frame(self, resolve: Callable[[np.ndarray], np.ndarray], device_bytes: int, device_peak_bytes: int,
                  next_start_mark: float | None = None) -> None:
        """Close the rows since the last call as one frame; once per frame, on the compute thread.

        `next_start_mark` is the next frame's first call (None at detach: the frame's gap is then unknown).
        Marks are resolved now (GPU: the events of this frame, before the pool reuses them); the frame's
        summary (~0.2 ms of small numpy passes for a tiny frame) waits until `frames` or a snapshot is read."""
        if not self._open:
            return
        self._gap_from_s = None  # a frame closes after the one closed at its unit's end: that one's gap stays unknown
        rows = np.array(self._open, dtype=np.float64).reshape(-1, COLUMNS)  # a new array: resolved in place
        self._open.clear()
        time_cols = [T_START, T_READY, T_DEQUANT, T_END]
        rows[:, time_cols] = resolve(rows[:, time_cols])  # fancy indexing reads a copy
        has_copy = rows[:, HAS_COPY] > 0
        if has_copy.any():
            copy_cols = np.ix_(has_copy, [C_START, C_COPIED, C_END])
            rows[copy_cols] = resolve(rows[copy_cols])
        rows.setflags(write=False)
        self.last_frame = int(rows[:, FRAME].max())
        span = self._work_span(resolve, float(rows[0, T_START]), float(rows[-1, T_END]), next_start_mark)
        # the prediction of the plan that ran the frame (a re-plan may replace it before the summary is made)
        p = self.prediction
        predicted = (p.frame_ms, p.compute_ms, p.copy_ms) if p else (None, None, None)
        first = int(rows[0, FRAME])
        kv = self._kv_of.get(first)
        for f in [f for f in self._kv_of if f != self._kv_frame]:
            del self._kv_of[f]  # closed (or left by a call cut short): only the open frame's stays
        self._unsummarised.append((rows, device_bytes, device_peak_bytes, predicted, kv, *span))  # one append
        self.closed_frames += 1

    def _work_span(self, resolve: Callable[[np.ndarray], np.ndarray], first_call_s: float, last_call_s: float,
                   next_start_mark: float | None) -> tuple[float, float, float]:
        """(work start, work end, gap) in seconds of the frame closing now; starts the next frame's units."""
        marks = (self._first_unit_start, self._last_unit_end, self._open_unit_start, next_start_mark)
        known = [m for m in marks if m is not None]
        seconds = iter(resolve(np.array(known, dtype=np.float64)).tolist() if known else ())
        first_s, last_end_s, open_s, next_s = (None if m is None else next(seconds) for m in marks)
        if self._carry_start_s is not None:
            start = self._carry_start_s
        else:  # a unit begun since the last frame end precedes the first call only in the first frame
            start = first_call_s if first_s is None else min(first_s, first_call_s)
        end = last_call_s if last_end_s is None else max(last_end_s, last_call_s)
        carry, gap = None, 0.0
        if self._in_unit and (open_s is None or open_s < last_call_s):  # one unit runs on into the next frame
            end = last_call_s if next_s is None else next_s
            carry = next_s
        elif self._in_unit:  # the next frame's unit began after this frame's work: the caller's time between
            gap, carry = open_s - end, open_s
        elif next_s is not None:  # the next frame's first call runs outside any unit
            gap = next_s - end
        self._carry_start_s = carry
        self._first_unit_start, self._last_unit_end, self._open_unit_start = None, None, None
        return start, end, max(0.0, gap)

    @property
    def frames(self) -> list[FrameRecord]:
        """Frame records, oldest first (the last KEEP_FRAMES); summarises the frames closed since last read."""
        return [record for record, _ in self._closed_frames()]

    def _closed_frames(self) -> deque[tuple[FrameRecord, np.ndarray]]:
        """(record, rows) of the kept frames, the frames closed since last read summarised first (a Ctrl-C between
        the pop and the append drops that frame whole)."""
        while self._unsummarised:
            item = self._unsummarised.popleft()
            self._closed.append((self._summarise(*item), item[0]))
        return self._closed

    def _summarise(self, rows: np.ndarray, device_bytes: int, device_peak_bytes: int,
                   predicted: tuple[float | None, float | None, float | None], kv_frames: int | None, start_s: float,
                   end_s: float, gap_s: float) -> FrameRecord:
        """The FrameRecord of one closed frame; `predicted` is (frame, compute, copy) ms of its plan."""
        has_copy = rows[:, HAS_COPY] > 0
        copy_s = np.where(has_copy, rows[:, C_COPIED] - rows[:, C_START], 0.0)
        copy_dq_s = np.where(has_copy, rows[:, C_END] - rows[:, C_COPIED], 0.0)
        stall_s = rows[:, T_READY] - rows[:, T_START]
        dq_s = rows[:, T_DEQUANT] - rows[:, T_READY]
        comp_s = rows[:, T_END] - rows[:, T_DEQUANT]
        # Per-block sums in one pass each (bincount), not a mask per block: this runs on the compute thread at
        # every frame end, and 17 masked passes took ~0.25 ms of a 42 ms tiny frame.
        block = rows[:, BLOCK].astype(np.intp)
        n = len(self.block_names)
        calls = np.bincount(block, minlength=n)
        sums = [np.bincount(block, weights=w, minlength=n)
                for w in (copy_s, copy_dq_s + dq_s, comp_s, stall_s, rows[:, LINK_BYTES])]
        blocks = [BlockTiming(self.block_names[b], int(calls[b]), float(sums[0][b] * 1e3), float(sums[1][b] * 1e3),
                              float(sums[2][b] * 1e3), float(sums[3][b] * 1e3), int(sums[4][b]))
                  for b in np.flatnonzero(calls)]
        return FrameRecord(
            frame=int(rows[0, FRAME]), start_s=start_s, frame_ms=(end_s - start_s) * 1e3,
            compute_ms=float(comp_s.sum() * 1e3), copy_ms=float(copy_s.sum() * 1e3),
            dequant_ms=float((copy_dq_s.sum() + dq_s.sum()) * 1e3), stall_ms=float(stall_s.sum() * 1e3),
            link_bytes=int(rows[:, LINK_BYTES].sum()), device_bytes=device_bytes,
            device_peak_bytes=device_peak_bytes, blocks=tuple(blocks),
            predicted_frame_ms=predicted[0],
            compute_busy_ms=float((dq_s.sum() + comp_s.sum()) * 1e3),
            copy_busy_ms=float((copy_s.sum() + copy_dq_s.sum()) * 1e3), gap_ms=gap_s * 1e3,
            predicted_compute_ms=predicted[1], predicted_copy_ms=predicted[2], kv_frames=kv_frames)

    def latest(self, n: int) -> list[tuple[FrameRecord, np.ndarray]]:
        """The newest `n` closed frames (at most the kept ones) with their resolved call rows, oldest first:
        what the closed loop reads after each unit, without copying every kept frame into a snapshot."""
        closed = self._closed_frames()
        n = min(max(n, 0), len(closed))
        return list(itertools.islice(closed, len(closed) - n, None))

    def snapshot(self, memory: tuple[tuple[str, int], ...] = ()) -> TelemetrySnapshot:
        """The kept frames and rows as a TelemetrySnapshot, with the ledger's `memory` (kind, bytes)."""
        closed = tuple(self._closed_frames())
        return TelemetrySnapshot(tuple(f for f, _ in closed), tuple(r for _, r in closed), self.block_names,
                                 self.prediction, memory, tuple(self._events))

    def add_event(self, event: LoopEvent) -> None:
        """Keep one closed-loop decision (the last KEEP_FRAMES) for snapshots, traces and the dashboard."""
        self._events.append(event)
