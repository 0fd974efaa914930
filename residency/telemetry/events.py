"""Events of the closed loop (calibrations, re-plans, plans kept): what the telemetry, the Chrome trace and the
dashboard show beside the frames, each with the reason in words."""

from __future__ import annotations

from dataclasses import dataclass

EVENT_KINDS = ("calibrated", "replanned", "kept", "capped")


@dataclass(frozen=True)
class LoopEvent:
    """One decision of the closed loop, at a frame boundary.

    kind: "calibrated" (the profile was corrected), "replanned" (the runtime switched plans), "kept" (a new
    plan was made but did not beat the running one), "capped" (a switch was due but the cap stopped it)."""
    unit: int  # units of work (session steps or top-level forwards) run before it, 1-based
    kind: str
    reason: str  # e.g. "frame 24: copy engine 2.7× slower than profiled — re-planned: 5 blocks now resident-Q8_0"
    measured_ms: float  # median measured frame (work) ms of the frames that triggered it
    predicted_ms: float  # the running plan's prediction then (ms)
    new_predicted_ms: float | None = None  # the new plan's (or the re-predicted plan's) prediction, ms
    time_s: float = 0.0  # the backend clock's seconds at the decision (trace and dashboard place it by this)

    def line(self) -> str:
        """The event as one line for a console or a trace label."""
        return f"[{self.kind}] {self.reason}"
