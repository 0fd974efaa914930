"""Online calibration: the runtime's per-call telemetry corrects the device profile the plan was made with.

The cost model predicts each block call from the profile; the recorder measures the same call. Per engine:

    compute measured = compute predicted · scale[block]     · g(f_k, s_k)
    copy measured    = copy predicted    · a_link            · g(f_c, s_c)
    dequant measured = dequant predicted · a_dequant[format] · g(f_d, s_k)
    g(f, s) = 1 / (1 − f · (1 − 1/s))

where f_k is the fraction of the call's compute (wall time) during which the copy engine was busy, f_c the
fraction of a copy during which compute ran, and s_k, s_c the profile's per-engine slowdowns: work that runs
at rate 1/s for a fraction f of its wall time takes g(f, s) times its lone time, as the simulator has it.

Compute scales are per block: the cost model's error differs by kind of block (a dispatch-bound embedding is
off by more than a matmul-bound transformer block, the VAE's levels each by their own), and a class-wide
scale mixed them into a false slowdown. A slowdown is read only within one block, from its calls that ran at
different shares beside the other engine (a robust line through 1/ratio over f: 1/r = (1 − f·(1 − 1/s)) /
scale), pooled over blocks. Without such spread (a streamed plan on a CPU copies under compute almost
always) the profile's slowdown — its probe's — is kept and the scale absorbs the rest, which is what a plan
of the same concurrency sees. Scales are medians with outliers dropped.

Per-engine rates (link, dequant, slowdowns) describe the machine and transfer to other plans and models;
compute scales per block belong to one model (`Calibration.workload_fingerprint`).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from residency.device.profile import Calibration, Curve, DeviceProfile, Provenance
from residency.errors import ResidencyError
from residency.plan import Plan
from residency.simulate.costs import compute_s, compute_scale_of, copy_bytes, copy_s, dequant_s, unpacks_fresh
from residency.telemetry.recorder import (
    BLOCK,
    C_COPIED,
    C_END,
    C_START,
    FRAME,
    HAS_COPY,
    LINK_BYTES,
    T_DEQUANT,
    T_END,
    T_READY,
    T_START,
    TelemetrySnapshot,
)
from residency.units import plural
from residency.workload import Workload

WARMUP_FRAMES = 2  # frames 1..2 are skipped: first-touch page faults, allocator growth, the ring filling
MIN_POINTS = 3  # fewer (frame, block) points than this leave a figure at the profile's value
MIN_SPREAD = 0.3  # a slowdown is read from a block whose shares beside the other engine span at least this
MIN_SLOPE_POINTS = 8  # ... and that has at least this many points
OUTLIER_MADS = 4.0  # points further than this many scaled MADs from the median are dropped
# A fitted scale outside these is a broken measurement, not a slow device. Compute: as a profile may hold it
# (profile_refinements.MAX_COMPUTE_SCALE). Engines: wider — a profile's link curve at small transfers includes the copy
# thread's hand-off, the runtime's marks time the memcpy alone (30× faster for a tiny model's 100 KB blobs).
SCALE_RANGE = (0.01, 100.0)
ENGINE_SCALE_RANGE = (1e-3, 1e3)
SLOWDOWN_RANGE = (1.0, 10.0)
TIME_TREND = 0.6  # |rank correlation| of a block's shares with time above which the spread is a change of the machine
LINK_KEYS = ("h2d_pinned", "h2d_pageable")  # the copy engine's curves (host->device); d2h is not timed


@dataclass(frozen=True)
class CalibrationFit:
    """What a calibration found: the corrected profile and the factors that made it from the base.

    Scales are measured ÷ predicted under the base profile (1.0 = the base was right); slowdowns are
    factors ≥ 1 (None: not separable from the scale in this telemetry, the base's kept)."""
    profile: DeviceProfile
    frames: int  # frames the fit used (after the warm-up)
    compute_scale: dict[str, float]  # per block ("dit.blocks.7")
    copy_scale: float | None  # link time measured ÷ predicted; None without copies
    dequant_scale: dict[str, float]  # per storage format
    compute_slowdown: float | None
    copy_slowdown: float | None
    points: dict[str, int]  # (frame, block) points per figure, for the report
    # host µs between calls: (per call of any block, more per streamed call); None: not fitted
    host_us: tuple[float, float] | None = None

    def summary(self) -> str:
        """One line: the factors found, e.g. "compute ×1.31 (dit.blocks.7), copy ×2.70, host 610 µs per
        streamed call"."""
        worst = sorted(self.compute_scale.items(), key=lambda kv: -abs(math.log(kv[1])))
        parts = [f"compute ×{v:.2f} ({k})" for k, v in worst[:3]]
        if len(worst) > 3:
            parts.append(f"{len(worst) - 3} more blocks within ×{min(v for _, v in worst[3:]):.2f}–"
                         f"{max(v for _, v in worst[3:]):.2f}")
        if self.copy_scale is not None:
            parts.append(f"copy ×{self.copy_scale:.2f}")
        parts += [f"{k} dequant ×{v:.2f}" for k, v in sorted(self.dequant_scale.items())]
        if self.host_us is not None:
            parts.append(f"host {self.host_us[0]:.0f} µs per call + {self.host_us[1]:.0f} µs more per streamed call")
        for label, s in (("compute slowdown", self.compute_slowdown), ("copy slowdown", self.copy_slowdown)):
            if s is not None:
                parts.append(f"{label} {s:.2f}")
        return ", ".join(parts) or "nothing to fit"


@dataclass
class _Points:
    """(measured ÷ predicted, concurrent fraction) pairs of one figure."""
    ratio: list[float] = dataclasses.field(default_factory=list)
    shared: list[float] = dataclasses.field(default_factory=list)

    def add(self, measured_s: float, predicted_s: float, shared: float) -> None:
        if predicted_s > 0 and measured_s > 0 and math.isfinite(measured_s):
            self.ratio.append(measured_s / predicted_s)
            self.shared.append(min(max(shared, 0.0), 1.0))


def robust_median(values: Iterable[float]) -> float:
    """Median after dropping points more than OUTLIER_MADS scaled MADs from the median (NaN when empty)."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return float("nan")
    med = float(np.median(x))
    mad = 1.4826 * float(np.median(np.abs(x - med)))
    if mad > 0:
        x = x[np.abs(x - med) <= OUTLIER_MADS * mad]
    return float(np.median(x))


class _Busy:
    """The union of one engine's busy intervals, for 'how much of [a, b] was it busy' in O(log n)."""

    def __init__(self, starts: np.ndarray, ends: np.ndarray):
        keep = ends > starts
        order = np.argsort(starts[keep], kind="stable")
        s, e = starts[keep][order], ends[keep][order]
        merged_s, merged_e = [], []
        for a, b in zip(s, e, strict=True):
            if merged_e and a <= merged_e[-1]:
                merged_e[-1] = max(merged_e[-1], b)
            else:
                merged_s.append(a)
                merged_e.append(b)
        self.s, self.e = np.asarray(merged_s), np.asarray(merged_e)
        self.cum = np.concatenate(([0.0], np.cumsum(self.e - self.s)))

    def _before(self, t: np.ndarray) -> np.ndarray:
        """Busy seconds in (-inf, t] for each t."""
        i = np.searchsorted(self.s, t, side="right")  # intervals starting at or before t
        full = self.cum[np.maximum(i - 1, 0)]
        last = np.where(i > 0, np.minimum(t, self.e[np.maximum(i - 1, 0)]) - self.s[np.maximum(i - 1, 0)], 0.0)
        return np.where(i > 0, full + np.maximum(last, 0.0), 0.0)

    def fraction(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Fraction of each [a, b] during which the engine was busy (0 for empty intervals)."""
        if self.s.size == 0:
            return np.zeros_like(a)
        span = b - a
        busy = self._before(b) - self._before(a)
        return np.where(span > 0, busy / np.where(span > 0, span, 1.0), 0.0)


def _call_predictions(workload: Workload, plan: Plan, profile: DeviceProfile, ctx: int) -> dict[str, float]:
    """Predicted compute seconds (dequant excluded) of each frame block summed over one frame's calls."""
    out: dict[str, float] = defaultdict(float)
    for ph in workload.frame_phases():
        for p in ph.passes:
            kv_read = p.kv != "none"
            for name in p.blocks:
                spec, bp = workload.by_name[name], plan.by_name[name]
                # compute_s applies the profile's compute_scale of the block's component
                out[name] += workload.count(p) * compute_s(spec, bp, profile, ctx, kv_read, plan.kv_dtype,
                                                           workload.batch)
    return out


def _frame_ctx(workload: Workload, frame: int, kv_frames: int | None) -> int:
    """KV frames latent frame `frame` read: what its session said (FrameRecord.kv_frames, up to the window), else
    as the simulator takes it — frame 1 one cached frame, later frames the full window. The simulator's steady
    frame is at the full window; a fit over frames while the window fills must not take them so: against
    full-window predictions, frame 3 of a 12-frame window of a block that spends a third of its time in that
    attention reads 25 % fast, and the fitted scale came out too low for every later frame. Without the session's
    figure (a frame not run by Runtime.step) the full window stands: frame numbers count the runtime's frames, not
    the session's (an attach to a running session, a recovery's retried frame, two sessions taking turns)."""
    if kv_frames is not None:
        return min(kv_frames, workload.context_frames)
    return min(frame, workload.context_frames) if frame == 1 else workload.context_frames


def _collect(snapshot: TelemetrySnapshot, workload: Workload, plan: Plan, profile: DeviceProfile,
             warmup_frames: int):
    """Points per figure from the snapshot's frames after the warm-up, and how many frames they came from."""
    rows_all = [r for r in snapshot.rows if r.size]
    if not rows_all:
        return None, 0
    rows = np.concatenate(rows_all)
    copy_busy = _Busy(rows[rows[:, HAS_COPY] > 0, C_START], rows[rows[:, HAS_COPY] > 0, C_END])
    compute_busy = _Busy(rows[:, T_READY], rows[:, T_END])
    used = rows[rows[:, FRAME] > warmup_frames]
    if used.size == 0:
        return None, 0
    names = snapshot.block_names
    compute: dict[str, _Points] = defaultdict(_Points)
    dequant: dict[str, _Points] = defaultdict(_Points)
    copy = _Points()
    f_compute = copy_busy.fraction(used[:, T_DEQUANT], used[:, T_END])
    f_dequant = copy_busy.fraction(used[:, T_READY], used[:, T_DEQUANT])
    f_copy = compute_busy.fraction(used[:, C_START], used[:, C_COPIED])
    predictions: dict[int, dict[str, float]] = {}
    # compute: one point per (frame, block), the frame's calls of the block summed (calls of one block
    # differ by pass: KV read or not), its concurrent fraction weighted by the calls' compute time
    key_rows: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (frame, block) in enumerate(zip(used[:, FRAME].astype(int), used[:, BLOCK].astype(int), strict=True)):
        key_rows[(frame, block)].append(i)
    kv_of = {f.frame: getattr(f, "kv_frames", None) for f in snapshot.frames}
    for (frame, block), idx in key_rows.items():
        name = names[block]
        ctx = _frame_ctx(workload, frame, kv_of.get(frame))
        if ctx not in predictions:
            predictions[ctx] = _call_predictions(workload, plan, profile, ctx)
        spec, bp = workload.by_name[name], plan.by_name[name]
        expected_calls = workload.calls_per_frame(name)
        if len(idx) != expected_calls or name not in predictions[ctx]:
            continue  # a partial frame (detach, recovery) or a call out of the plan's schedule
        measured = used[idx, T_END] - used[idx, T_DEQUANT]
        total = float(measured.sum())
        shared = float((f_compute[idx] * measured).sum() / total) if total > 0 else 0.0
        compute[name].add(total, predictions[ctx][name], shared)
        deq_pred = dequant_s(spec, bp.format, bp.compute_dtype, profile, unpacks_fresh(bp))
        if deq_pred > 0:
            on_compute = used[idx, T_DEQUANT] - used[idx, T_READY]
            on_copy = np.where(used[idx, HAS_COPY] > 0, used[idx, C_END] - used[idx, C_COPIED], 0.0)
            side = on_copy if bp.placement == "streamed" and bp.dequant_on == "copy" else on_compute
            share = f_dequant[idx] if side is on_compute else f_copy[idx]
            for m, s in zip(side, share, strict=True):
                dequant[bp.format].add(float(m), deq_pred, float(s))
    for i in np.flatnonzero(used[:, HAS_COPY] > 0):
        name = names[int(used[i, BLOCK])]
        spec, bp = workload.by_name[name], plan.by_name[name]
        nbytes = int(used[i, LINK_BYTES])
        if nbytes == 0:
            continue  # a CPU load that only unpacks (from the host blob): no copy to time
        unpacks = bp.placement == "streamed" and bp.dequant_on == "copy"
        if bp.placement == "streamed" and nbytes == copy_bytes(spec, bp.format, bp.compute_dtype, profile, unpacks):
            pred = copy_s(spec, bp.format, profile, plan.execution, bp.compute_dtype, unpacks)
        else:  # a phase block's load (several blobs, one span) or a resident block's first load
            pred = profile.h2d_s(nbytes, plan.execution.pinned)
        copy.add(float(used[i, C_COPIED] - used[i, C_START]), pred, float(f_copy[i]))
    frames = len({int(f) for f in used[:, FRAME]})
    return (compute, dequant, copy, _host_us(snapshot, plan, warmup_frames)), frames


def _host_us(snapshot: TelemetrySnapshot, plan: Plan, warmup_frames: int) -> tuple[float, float] | None:
    """(µs per call of any block, more µs per streamed call) of the work outside every block call, or None
    without known frame spans.

    A frame's outside time is its span less its calls' spans: the gaps between calls plus its two ends. Each gap
    is the call's before it (its hook's after(), the model's code up to the next block), the ends are spread
    over all calls; a = (gaps after non-streamed calls + ends) ÷ their count, b = gaps after streamed calls ÷
    their count − a. Medians over frames."""
    streamed = np.array([bp.placement == "streamed" for bp in plan.blocks])
    per_call, extra = [], []
    for frame, rows in zip(snapshot.frames, snapshot.rows, strict=True):
        if frame.frame <= warmup_frames or len(rows) < 2 or not frame.frame_ms > 0:
            continue
        is_streamed = streamed[rows[:, BLOCK].astype(np.intp)]
        gaps = np.maximum(rows[1:, T_START] - rows[:-1, T_END], 0.0)  # the gap after call i, for i < last
        ends = max(frame.frame_ms / 1e3 - float(rows[-1, T_END] - rows[0, T_START]), 0.0)
        after_streamed = gaps[is_streamed[:-1]]
        others = len(rows) - int(is_streamed.sum())
        a = (float(gaps[~is_streamed[:-1]].sum()) + ends) / max(others, 1) if others else 0.0
        per_call.append(a * 1e6)
        if after_streamed.size:
            extra.append(max(float(after_streamed.mean()) - a, 0.0) * 1e6)
    if len(per_call) < MIN_POINTS:
        return None
    return robust_median(per_call), (robust_median(extra) if len(extra) >= MIN_POINTS else 0.0)


def stretch(shared: np.ndarray, slowdown: float) -> np.ndarray:
    """g(f, s): how much longer work takes when a fraction f of its wall time ran at rate 1/s."""
    return 1.0 / (1.0 - shared * (1.0 - 1.0 / slowdown))


def _slowdown(points: _Points) -> tuple[float, int] | None:
    """(slowdown, points) read from one block's points, or None when their shares do not spread enough, the spread
    is the machine changing mid-window, or the line runs past SLOWDOWN_RANGE.

    Points come in time order. Interference shows in any stretch of time: a block's calls meet the other engine at
    shares that vary from frame to frame. Shares that trend with time instead (rank correlation with the point's
    index of TIME_TREND or more: a chance of ~1 in 70 on 16 calm frames) are what a program that starts mid-window
    looks like: it slows the calls and lengthens the copies they run beside, so share and time rise together, and
    read across the window that is a steep line (a 1.5× step read as a 1.9× slowdown, a 3× step as 7.8×). Then each
    half is read alone and the halves averaged (a step between them moves neither); where neither half spreads,
    nothing is read."""
    from scipy.stats import spearmanr

    r, f = np.asarray(points.ratio), np.asarray(points.shared)
    if len(r) < MIN_SLOPE_POINTS or not _spreads(f):
        return None
    trend = spearmanr(np.arange(len(f)), f).statistic
    if not abs(trend) >= TIME_TREND:  # NaN (ties everywhere) reads as no trend
        return _line_slowdown(r, f)
    h = len(r) // 2
    halves = [x for x in (_line_slowdown(r[:h], f[:h]), _line_slowdown(r[h:], f[h:])) if x is not None]
    if not halves:
        return None
    return float(np.average([v for v, _ in halves], weights=[n for _, n in halves])), sum(n for _, n in halves)


def _spreads(shared: np.ndarray) -> bool:
    return bool(np.quantile(shared, 0.9) - np.quantile(shared, 0.1) >= MIN_SPREAD)


def _line_slowdown(r: np.ndarray, f: np.ndarray) -> tuple[float, int] | None:
    """(slowdown, points) from one stretch of points, or None when its shares do not spread or its line runs past
    SLOWDOWN_RANGE.

    1/r = (1 − f·(1 − 1/s)) / scale is a line in f: a Theil–Sen fit (median of pairwise slopes, robust to a
    third of the points being outliers) gives intercept 1/scale and slope −(1 − 1/s)/scale. A line steeper than
    the range's top is not interference but a confound; it is left unread rather than clamped to the top: a 10×
    slowdown predicts every streaming plan far too slow."""
    from scipy.stats import theilslopes

    if len(r) < MIN_SLOPE_POINTS or not _spreads(f):
        return None
    slope, intercept, _, _ = theilslopes(1.0 / r, f)
    if intercept <= 0:
        return None
    lost = max(-slope / intercept, 0.0)  # 1 − 1/s
    if lost > 1.0 - 1.0 / SLOWDOWN_RANGE[1]:
        return None
    return 1.0 / (1.0 - lost), len(r)


def _pooled_slowdown(groups: Iterable[_Points]) -> float | None:
    """The slowdown read from every block that can tell it (weighted by points), clamped to SLOWDOWN_RANGE."""
    found = [x for x in (_slowdown(g) for g in groups) if x is not None]
    if not found:
        return None
    s = float(np.average([v for v, _ in found], weights=[n for _, n in found]))
    return min(max(s, SLOWDOWN_RANGE[0]), SLOWDOWN_RANGE[1])


def _scale(points: _Points, slowdown: float) -> float:
    """measured ÷ predicted with the interference under `slowdown` taken out (robust median)."""
    return robust_median(np.asarray(points.ratio) / stretch(np.asarray(points.shared), slowdown))


def _in_range(name: str, scale: float, limits: tuple[float, float] = SCALE_RANGE) -> float:
    """`scale`, or a ResidencyError naming the figure when it lies outside `limits`."""
    if not (limits[0] <= scale <= limits[1]):
        raise ResidencyError(f"calibration: {name} measured {scale:.3g}× its prediction, outside "
                             f"{limits[0]:g}–{limits[1]:g}×: the telemetry is broken, not the device slow",
                             hint="calibrate on a run of the plan the profile predicted (same model, same device)")
    return scale


def _scaled_curve(curve: Curve, time_scale: float) -> Curve:
    """The curve with rates divided by `time_scale` (times measured that much longer than predicted)."""
    return Curve(curve.x, tuple(y / time_scale for y in curve.y), curve.spread)


def calibrate(snapshot: TelemetrySnapshot, workload: Workload, plan: Plan, profile: DeviceProfile, *,
              model: str = "", warmup_frames: int = WARMUP_FRAMES, date: str | None = None) -> CalibrationFit:
    """Fit `profile` (the one `plan` was predicted with) to the measured calls of `snapshot`.

    Frames up to `warmup_frames` are skipped; each figure needs MIN_POINTS (frame, block) points or keeps
    the profile's value. Returns a CalibrationFit whose profile carries the corrected link curves, dequant
    rates, compute scales and slowdowns, with provenance "calibrated from N frames of MODEL on DATE".
    Raises ResidencyError when no frame after the warm-up was recorded, or a scale is absurd (> 50× off).
    """
    plan.check_matches(workload, f"workload {workload.name!r}")
    collected, frames = _collect(snapshot, workload, plan, profile, warmup_frames)
    if collected is None:
        raise ResidencyError(f"calibration needs frames after the first {warmup_frames}; the telemetry holds "
                             f"{len(snapshot.frames)} frame(s)", hint="run more frames before calibrating")
    compute, dequant, copy, host_us = collected
    # the compute slowdown is the device's: read within each block (its own scale), pooled over blocks
    fitted_k = _pooled_slowdown(p for p in compute.values() if len(p.ratio) >= MIN_POINTS)
    s_k = fitted_k if fitted_k is not None else profile.compute_slowdown_factor()
    comp_scale = {c: _in_range(f"{c} compute", _scale(p, s_k))
                  for c, p in compute.items() if len(p.ratio) >= MIN_POINTS}
    copy_scale, fitted_c = (None, None)
    if len(copy.ratio) >= MIN_POINTS:
        fitted_c = _pooled_slowdown([copy])
        copy_scale = _in_range("copy", _scale(copy, fitted_c or profile.copy_slowdown_factor()), ENGINE_SCALE_RANGE)
    deq_scale = {fmt: _in_range(f"{fmt} dequant", _scale(pts, s_k), ENGINE_SCALE_RANGE)
                 for fmt, pts in dequant.items() if len(pts.ratio) >= MIN_POINTS}
    fit_points = {f"compute {c}": len(p.ratio) for c, p in compute.items()}
    fit_points["copy"] = len(copy.ratio)
    fit_points.update({f"dequant {f}": len(p.ratio) for f, p in dequant.items()})
    # the scales are measured ÷ predicted under the base profile's own scales: the new ones compound them
    base_scale = {b.name: compute_scale_of(profile, b) for b in workload.blocks}
    absolute = {k: base_scale.get(k, 1.0) * v for k, v in comp_scale.items()}
    new = _calibrated_profile(profile, workload, absolute, copy_scale, _with_fallbacks(deq_scale, workload, plan),
                              fitted_k, fitted_c, host_us, model or workload.name, frames, date)
    return CalibrationFit(new, frames, comp_scale, copy_scale, deq_scale, fitted_k, fitted_c, fit_points, host_us)


def _with_fallbacks(deq_scale: dict[str, float], workload: Workload, plan: Plan) -> dict[str, float]:
    """`deq_scale` and, for each format only seen as the fallback of fitted blocks (the BF16 vectors of a Q8_0
    block), the median scale of those blocks' formats: a block's points are its whole dequant measured ÷
    predicted, so scaling its own format alone left its fallen-back tensors' share — up to a third of a small
    block's dequant with per-call costs — at the base profile's time. A format fitted on its own keeps its fit."""
    seen: dict[str, list[float]] = defaultdict(list)
    for bp in plan.blocks:
        scale = deq_scale.get(bp.format)
        if scale is None or bp.name not in workload.by_name:
            continue
        for stored, *_ in workload.by_name[bp.name].dequant_work(bp.format, bp.compute_dtype):
            if stored != bp.format and stored not in deq_scale:
                seen[stored].append(scale)
    return {**deq_scale, **{f: float(np.median(v)) for f, v in seen.items()}}


def _calibrated_profile(base: DeviceProfile, workload: Workload, comp_scale: dict[str, float],
                        copy_scale: float | None, deq_scale: dict[str, float], s_k: float | None,
                        s_c: float | None, host_us: tuple[float, float] | None, model: str, frames: int,
                        date: str | None) -> DeviceProfile:
    """The base profile with what the fit found; `comp_scale` holds absolute scales (the base's compounded),
    kept beside the base's other keys when the base was calibrated on the same model."""
    day = date or datetime.date.today().isoformat()
    source = f"calibrated from {plural(frames, 'frame')} of {model} on {day}"
    changed: dict[str, object] = {}
    if copy_scale is not None:
        changed["link"] = {k: (_scaled_curve(c, copy_scale) if k in LINK_KEYS else c) for k, c in base.link.items()}
    if deq_scale:  # rate and per-call cost alike: a block's whole dequant time scales (with its fallen-back
        # tensors' formats: _with_fallbacks)
        changed["dequant_gweights_per_s"] = {f: r / deq_scale.get(f, 1.0) for f, r in base.dequant_gweights_per_s.items()}
        if base.dequant_call_us:
            changed["dequant_call_us"] = {f: c * deq_scale.get(f, 1.0) for f, c in base.dequant_call_us.items()}
        if base.dequant_tensor_gweights_per_s:
            changed["dequant_tensor_gweights_per_s"] = {
                f: _scaled_curve(c, deq_scale.get(f, 1.0)) for f, c in base.dequant_tensor_gweights_per_s.items()}
    if comp_scale:
        kept = dict(base.compute_scale) if _same_workload(base, workload) else {}
        changed["compute_scale"] = {**kept, **comp_scale}
    if s_k is not None:
        changed["compute_slowdown"] = s_k
    if s_c is not None:
        changed["copy_slowdown"] = s_c
    if host_us is not None:
        changed["call_host_us"], changed["streamed_call_host_us"] = host_us
    provenance = dict(base.provenance)
    for key in changed:
        provenance[key] = Provenance("calibrated", source)
    root = base.calibration.base_fingerprint if base.calibration else base.fingerprint()
    calibration = Calibration(base_fingerprint=root, workload_fingerprint=workload.fingerprint(), model=model,
                              frames=frames, date=day, note=source)
    return dataclasses.replace(base, **changed, provenance=provenance, calibration=calibration)


def _same_workload(profile: DeviceProfile, workload: Workload) -> bool:
    return profile.calibration is not None and profile.calibration.workload_fingerprint == workload.fingerprint()


def for_workload(profile: DeviceProfile, workload: Workload) -> DeviceProfile:
    """The profile to plan `workload` with (calibrated.for_workload_fingerprint: another model's compute scales
    dropped, the per-engine rates kept)."""
    from residency.device.calibrated import for_workload_fingerprint

    return for_workload_fingerprint(profile, workload.fingerprint())


def prediction_errors(measured_ms: Sequence[float], predicted_ms: float) -> float:
    """Median relative error of `measured_ms` frames against `predicted_ms` (e.g. +0.36 = 36 % slower)."""
    return robust_median(m / predicted_ms - 1 for m in measured_ms) if predicted_ms > 0 else float("nan")


def calibration_window(snapshot: TelemetrySnapshot, warmup_frames: int = WARMUP_FRAMES,
                       since_s: float = float("-inf")) -> TelemetrySnapshot:
    """The frames a calibration of the running plan fits: latent frames (frame ≥ 1) that started after the last
    plan switch of `snapshot` ("replanned" event) and at or after `since_s` (the running plan's start, where the
    caller knows it: Runtime.plan_started_s), less the first `warmup_frames` of them; rows kept beside."""
    switched_s = max([since_s, *(e.time_s for e in snapshot.events if e.kind == "replanned")])
    return snapshot.with_frames([(f, r) for f, r in zip(snapshot.frames, snapshot.rows, strict=True)
                                 if f.frame > 0 and f.start_s >= switched_s][warmup_frames:])
