"""What the dashboard shows beside a telemetry snapshot: the run's name, its budgets and its frame unit.

Frozen and JSON-ready, so a trace file can carry it and a replay shows the same budgets as the live run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class DashboardContext:
    """What a dashboard shows beside the telemetry: its title and the budgets the run is held to."""
    title: str  # e.g. "tiny · cpu · plan ours"
    vram_budget_bytes: int | None = None  # device bytes the plan may use; None: unknown (a plain trace)
    frame_budget_ms: float | None = None  # ms per latent frame to hold; None: no latency target
    video_frames_per_latent: int = 1  # video frames each latent frame decodes to (fps counts video frames)
    # the device the plan's predictions are for when it is not the one running ("Radeon RX 7800 XT, a GPU
    # profile, not this CPU"): predictions are shown, not divided into measurements; None: they compare
    predicted_for: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (as stored in a trace file)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DashboardContext:
        """A context from `doc`; unknown keys are ignored, missing ones take their defaults.

        Raises TypeError when `doc` lacks "title". Values are not validated (trace_io does that).
        """
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})

    def video_fps(self, latent_frame_ms: float) -> float:
        """Video frames per second at `latent_frame_ms` per latent frame (0 when not measured)."""
        return 1000.0 * self.video_frames_per_latent / latent_frame_ms if latent_frame_ms > 0 else 0.0
