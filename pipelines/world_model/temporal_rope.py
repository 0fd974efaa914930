"""Temporal RoPE with positions relative to the frame being generated.

Queries sit at position 0 and are never rotated; a cached key is rotated by its distance to
the current frame, so eviction never shifts memory: only an S-row cos/sin table changes.
"""

from __future__ import annotations

import torch


def relative_position(current_frame: int, past_frame: int, context_frames: int) -> int:
    """Distance of a past frame from the current one, clamped to the window size.

    Recent frames are contiguous, so their distance is at most context_frames-1; only the
    anchor (frame 0) is ever farther, and it is placed just beyond the oldest recent frame.
    """
    return min(current_frame - past_frame, context_frames)


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (len(positions), 1, head_dim//2): one row per frame, shared by its tokens."""
    half = head_dim // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]  # float64: exact for any position
    return angles.cos().to(dtype)[:, None, :], angles.sin().to(dtype)[:, None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Out-of-place rotation of x (..., frames, tokens, head_dim); allocates (reference path)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotate_(x: torch.Tensor, tmp: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In-place rotation, same arithmetic as `rotate`; `tmp` holds one half (no allocation).

    Compiled, it is not bit-exact: torch.compile rewrites addcmul_(value=-1.0) into a fused multiply-add that
    rounds otherwise (~1 ulp per call). Avoiding it costs one more op or table slice per block call, which
    would change the catalog's counted ops; the drift stays within tests/test_compile_blocks.py's tolerance.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    tmp.copy_(x1)
    x1.mul_(cos).addcmul_(x2, sin, value=-1.0)
    x2.mul_(cos).addcmul_(tmp, sin)
    return x
