"""Timing helpers shared by the CPU and GPU measurements: warm-up, median and p10/p90 spread.

Pure arithmetic (spread, overlap) lives here too, so it is tested without a device.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

ProgressFn = Callable[[str, int, int], None]  # (step label, steps done, steps in all)


@dataclass(frozen=True)
class Timing:
    """Seconds per sample of a repeated measurement: median, 10th and 90th percentile, sample count."""
    median_s: float  # median seconds of one sample
    p10_s: float
    p90_s: float
    samples: int

    @property
    def spread(self) -> float:
        """(p90 − p10) / median: the relative width of the middle 80 % of samples."""
        return spread_of_times(self.p10_s, self.p90_s, self.median_s)


def spread_of_times(p10_s: float, p90_s: float, median_s: float) -> float:
    """(p90 − p10) / median: how wide a measurement's samples spread, 0 for identical ones."""
    return 0.0 if median_s <= 0 else max(0.0, (p90_s - p10_s) / median_s)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an already sorted list, q in [0, 1]."""
    if not sorted_values:
        raise ValueError("percentile of no samples")
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def summarize(samples_s: list[float]) -> Timing:
    """Median, p10 and p90 of timed samples in seconds."""
    s = sorted(samples_s)
    return Timing(statistics.median(s), percentile(s, 0.1), percentile(s, 0.9), len(s))


def time_samples(fn: Callable[[], object], repeats: int, warmup: int = 1,
                 sync: Callable[[], object] | None = None) -> Timing:
    """Wall-clock seconds of `fn` per call: `warmup` untimed calls, then `repeats` timed ones.

    `sync` (e.g. torch.cuda.synchronize) runs before the clock stops, so asynchronous work is counted.
    """
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        samples.append(time.perf_counter() - t0)
    return summarize(samples)


def repeats_for(one_call_s: float, budget_s: float, lo: int = 3, hi: int = 50) -> int:
    """How many timed calls fit in `budget_s` given one call's cost, clamped to [lo, hi]."""
    if one_call_s <= 0:
        return hi
    return max(lo, min(hi, int(budget_s / one_call_s)))


def overlap_fraction(copy_s: float, compute_s: float, both_s: float) -> float:
    """Fraction of the shorter activity hidden under the longer one when both run at once.

    1 when `both_s` equals the longer of the two, 0 when it equals their sum; clipped to [0, 1].
    """
    shorter = min(copy_s, compute_s)
    if shorter <= 0:
        return 0.0
    return min(1.0, max(0.0, (copy_s + compute_s - both_s) / shorter))



class Steps:
    """The measurement steps of a profile, reported to a progress callback as each one starts."""

    def __init__(self, formats: list[str], compute_dtypes: tuple[str, ...], progress: ProgressFn | None,
                 matmul_extra: tuple[str, ...] = ()):
        self.labels = ["memory", "link", "device memory", *(f"matmul {d}" for d in compute_dtypes), *matmul_extra,
                       *(f"dequant {f}" for f in formats), "overlap", "launch overhead"]
        self.progress = progress
        self.done = 0

    def __call__(self, label: str) -> None:
        if self.progress is not None:
            self.progress(label, self.done, len(self.labels))
        self.done += 1

    def finish(self) -> None:
        """Report the last step done to the progress callback, if any."""
        if self.progress is not None:
            self.progress("done", len(self.labels), len(self.labels))
