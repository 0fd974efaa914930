"""The cost model: one simulator that chooses plans and predicts what the runtime will measure.

`simulate(workload, plan, profile)` gives the timeline and the Prediction; `predict` fills a plan's.
"""

from residency.simulate.bounds import compute_floor_s, lower_bound_s
from residency.simulate.memory import KINDS, peak_bytes, slot_bytes
from residency.simulate.quality import block_error, format_error, format_errors, quality_loss
from residency.simulate.simulate import Simulation, TimelineEvent, predict, simulate

__all__ = [
    "KINDS",
    "Simulation",
    "TimelineEvent",
    "block_error",
    "compute_floor_s",
    "format_error",
    "format_errors",
    "lower_bound_s",
    "peak_bytes",
    "predict",
    "quality_loss",
    "simulate",
    "slot_bytes",
]
