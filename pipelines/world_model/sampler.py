"""Few-step flow-matching sampler: x_t = (1-t)·x0 + t·noise, the DiT predicts v = noise - x0.

Euler from t=1 to t=0 on a (optionally shifted) grid; the same code serves the cached
session and the non-cached reference, so both see identical timesteps and noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def timesteps(steps: int, shift: float = 1.0) -> list[float]:
    """steps+1 times from 1.0 down to 0.0; shift > 1 spends more steps at high noise (SD3)."""
    grid = [1.0 - i / steps for i in range(steps + 1)]
    return [shift * t / (1.0 + (shift - 1.0) * t) for t in grid]


def sample(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    times: list[torch.Tensor],
) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from times[0] (=1) to times[-1] (=0); times are (B,) tensors.

    `times` is built once per session, so a frame allocates no timestep tensors.
    """
    x = noise
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        x = x + (t_next - t)[:, None, None, None] * velocity(x, t)
    return x
