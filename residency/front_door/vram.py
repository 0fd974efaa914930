"""The budget arguments of residency.attach and residency.make_plan: `vram=` (bytes, a size ("12GiB") or a
share of the model's weights ("50%")) and `fps=` / `frame_ms=`."""

from __future__ import annotations

import math

from residency.budget_size import VramSpec, vram_bytes
from residency.errors import ResidencyError
from residency.formats.dtypes import DTYPE_FORMAT

__all__ = ["COMPUTE_FORMAT", "VramSpec", "frame_budget_ms", "vram_bytes"]
COMPUTE_FORMAT = DTYPE_FORMAT  # weights as the model computes them (the name the front door uses)


def frame_budget_ms(fps: float | None, frame_ms: float | None, video_frames_per_latent: int) -> float | None:
    """The time budget in ms per latent frame: from `fps` (video frames per second; a latent frame decodes to
    `video_frames_per_latent` of them) or `frame_ms` as given; None when neither (the fastest plan that fits).
    Raises ResidencyError when both are given or one is not positive."""
    for name, value in (("fps", fps), ("frame_ms", frame_ms)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ResidencyError(f"{name}={value!r} ({type(value).__name__}): a time budget is a number",
                                 hint=f"e.g. {name}={30 if name == 'fps' else 50}")
    if fps is not None and frame_ms is not None:
        raise ResidencyError(f"both fps={fps} and frame_ms={frame_ms}", hint="give one time budget, or neither")
    if fps is not None:
        if not 0 < fps < math.inf:  # inf read as a frame budget of 0 ms, in Budget's words
            raise ResidencyError(f"fps={fps} must be a positive, finite number",
                                 hint="e.g. fps=15; no time budget (the fastest plan that fits): leave fps out")
        return 1000.0 * video_frames_per_latent / fps
    if frame_ms is not None and not 0 < frame_ms < math.inf:
        raise ResidencyError(f"frame_ms={frame_ms} must be a positive, finite number",
                             hint="e.g. frame_ms=50; no time budget (the fastest plan that fits): leave frame_ms out")
    return frame_ms
