"""The recorder: one row of raw timestamp marks per block call, closed into one array per latent frame.

An open frame's rows are tuples in a bounded deque; at frame end they become one array and their marks are
resolved to seconds (GPU: CUDA events); a frame's summary (FrameRecord) is made when `frames` is read.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from residency.plan import Prediction

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
    start_s: float  # first call's start, on the backend's clock
    frame_ms: float  # from this frame's first call to the next frame's first call (or its own last end)
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


@dataclass(frozen=True)
class TelemetrySnapshot:
    """An immutable copy of the recorder's kept frames, their call rows and the ledger's bytes."""
    frames: tuple[FrameRecord, ...]  # oldest first
    rows: tuple[np.ndarray, ...]  # resolved call rows per kept frame (seconds), read-only
    block_names: tuple[str, ...]
    prediction: Prediction | None
    memory: tuple[tuple[str, int], ...]  # ledger bytes by kind at the snapshot

    def steady_frame_ms(self, skip: int = 2) -> float:
        """Median measured ms of latent frames after the first `skip` (session start excluded)."""
        ms = sorted(f.frame_ms for f in self.frames if f.frame > skip)
        return ms[len(ms) // 2] if ms else float("nan")


class Recorder:
    """Keeps the timestamps of every block call and sums them per frame (the last KEEP_FRAMES frames).

    record() runs on the compute thread on every call: it only appends a tuple (~0.1 us).
    """
    def __init__(self, block_names: list[str], prediction: Prediction | None):
        self.block_names = tuple(block_names)
        self.prediction = prediction
        # The open frame's rows as tuples: an append costs ~0.1 µs where six scalar writes into a numpy row
        # cost ~5 µs (per call, on the compute thread); a frame's rows become one array at its end.
        self._open: deque[tuple] = deque(maxlen=RING_CALLS)
        self._frames: deque[FrameRecord] = deque(maxlen=KEEP_FRAMES)
        self._unsummarised: deque[tuple] = deque(maxlen=KEEP_FRAMES)  # closed frames' rows, not yet summarised
        self._resolved: deque[np.ndarray] = deque(maxlen=KEEP_FRAMES)

    def record(self, frame: int, block: int, t_start: float, t_ready: float, t_dequant: float, t_end: float,
               copy: tuple[float, float, float] | None, link_bytes: int) -> None:
        """Append one call's marks (backend clock units) and, for a load, its copy marks and bytes.

        `block` is the block's index in block_names; `copy` is (start, copied, end) or None without a load.
        """
        if copy is None:
            self._open.append((frame, block, t_start, t_ready, t_dequant, t_end, 0.0, 0.0, 0.0, 0, 0.0))
        else:
            self._open.append((frame, block, t_start, t_ready, t_dequant, t_end, *copy, link_bytes, 1.0))

    def end_frame(self, resolve: Callable[[np.ndarray], np.ndarray], device_bytes: int, device_peak_bytes: int,
                  next_start_mark: float | None = None) -> None:
        """Close the rows since the last call as one frame; once per frame, on the compute thread.

        Marks are resolved now (GPU: the events of this frame, before the pool reuses them); the frame's
        summary (~0.2 ms of small numpy passes for a tiny frame) waits until `frames` or a snapshot is read."""
        if not self._open:
            return
        rows = np.array(self._open, dtype=np.float64).reshape(-1, COLUMNS)  # a new array: resolved in place
        self._open.clear()
        time_cols = [T_START, T_READY, T_DEQUANT, T_END]
        rows[:, time_cols] = resolve(rows[:, time_cols])  # fancy indexing reads a copy
        has_copy = rows[:, HAS_COPY] > 0
        if has_copy.any():
            copy_cols = np.ix_(has_copy, [C_START, C_COPIED, C_END])
            rows[copy_cols] = resolve(rows[copy_cols])
        rows.setflags(write=False)
        self._resolved.append(rows)
        next_start_s = None if next_start_mark is None else float(resolve(np.array([next_start_mark]))[0])
        self._unsummarised.append((rows, device_bytes, device_peak_bytes, next_start_s))

    @property
    def frames(self) -> deque[FrameRecord]:
        """Frame records, oldest first (the last KEEP_FRAMES); summarises the frames closed since last read."""
        while self._unsummarised:
            self._frames.append(self._summarise(*self._unsummarised.popleft()))
        return self._frames

    def _summarise(self, rows: np.ndarray, device_bytes: int, device_peak_bytes: int,
                   next_start_s: float | None) -> FrameRecord:
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
        start = float(rows[0, T_START])
        end = next_start_s if next_start_s is not None else float(rows[-1, T_END])
        return FrameRecord(
            frame=int(rows[0, FRAME]), start_s=start, frame_ms=(end - start) * 1e3,
            compute_ms=float(comp_s.sum() * 1e3), copy_ms=float(copy_s.sum() * 1e3),
            dequant_ms=float((copy_dq_s.sum() + dq_s.sum()) * 1e3), stall_ms=float(stall_s.sum() * 1e3),
            link_bytes=int(rows[:, LINK_BYTES].sum()), device_bytes=device_bytes,
            device_peak_bytes=device_peak_bytes, blocks=tuple(blocks),
            predicted_frame_ms=self.prediction.frame_ms if self.prediction else None,
            compute_busy_ms=float((dq_s.sum() + comp_s.sum()) * 1e3),
            copy_busy_ms=float((copy_s.sum() + copy_dq_s.sum()) * 1e3))

    def snapshot(self, memory: tuple[tuple[str, int], ...] = ()) -> TelemetrySnapshot:
        """The kept frames and rows as a TelemetrySnapshot, with the ledger's `memory` (kind, bytes)."""
        return TelemetrySnapshot(tuple(self.frames), tuple(self._resolved), self.block_names, self.prediction, memory)
