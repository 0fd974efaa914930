"""Rollouts of a world model and their error: what the quality tests and the sensitivity tool measure.

Storage formats are simulated by round-tripping weights through `residency.formats` (pack, then
unpack to fp32), tensor by tensor under the same fallback rule the planner sizes blocks with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from residency.formats import get_format
from residency.formats.sizing import effective_format


def rollout(pipe, image: np.ndarray, actions: Sequence[int | str], seed: int = 0) -> np.ndarray:
    """(len(actions), H, W, 3) uint8: the decoded frames of a cached session from `image`."""
    session = pipe.start(image, seed=seed)
    return np.concatenate([session.step(a) for a in actions])


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error of uint8 frames, in units of (full scale)², i.e. pixels scaled to [0, 1]."""
    return float(np.mean(((a.astype(np.float64) - b.astype(np.float64)) / 255.0) ** 2))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 frames (peak 255) over all their pixels together."""
    err = mse(a, b)
    return math.inf if err == 0.0 else 10.0 * math.log10(1.0 / err)


def _weights(module: torch.nn.Module) -> Iterator[torch.nn.Parameter]:
    return (p for p in module.parameters() if p.ndim >= 2)


@contextmanager
def stored_as(modules: Iterable[torch.nn.Module], fmt_name: str) -> Iterator[int]:
    """Within the block, the matrices of `modules` hold the values format `fmt_name` would store.

    Yields how many tensors changed (0: the format stores these weights exactly, e.g. BF16
    weights read as BF16, or every tensor falls back to BF16). Restores the weights on exit.
    """
    fmt = get_format(fmt_name)
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for module in modules:
                for p in _weights(module):
                    approx = effective_format(fmt, tuple(p.shape)).roundtrip(p.detach().float().cpu())
                    if not torch.equal(approx.to(p.dtype), p.detach().cpu()):
                        saved.append((p, p.detach().clone()))
                        p.copy_(approx.to(p.device, p.dtype))
        yield len(saved)
    finally:
        with torch.no_grad():
            for p, original in saved:
                p.copy_(original)
