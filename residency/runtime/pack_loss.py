"""The loss a packed weight really has, against the loss the plan assumed for its format.

The planner prices a format by its error on a probe matrix of unit-scale weights (simulate.quality). Real
weights can lose far more: values too small for a format's fp16 scales (Q8_0 at weight RMS 1e-5 loses 10x its
nominal error, at 1e-6 nearly everything), outliers no probe has. Packing has both the weights and their bytes,
so each lossy tensor is decoded once and measured — over the whole tensor, and over the weights that are not outliers
(a few large weights hold a tensor's norm, hiding what their neighbours lose) — and one far beyond the assumption is
reported, not hidden. Cost: one unpack into an fp32 temporary per packed tensor, a sampled median and a few norms
(tens of ms per 16 M weights, against the seconds a K-quant pack takes); none for BF16, whose loss is bounded
whatever the values.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from residency.errors import PlanWarning, user_stacklevel
from residency.formats import get_format
from residency.simulate.quality import format_error

# Reported when the measured error exceeds the assumed one by both: a factor (a real weight set spreads ~±30 %
# around the probe's figure) and an absolute step (F16 at RMS 1e-5 loses 6x its tiny nominal 0.02 %: harmless).
EXCESS_FACTOR = 3.0
EXCESS_ABS = 0.02


@dataclass(frozen=True)
class LossExcess:
    """One packed tensor whose relative RMS error is far beyond what the plan assumed for its format."""

    block: str
    tensor: str  # relative to the block
    format: str
    measured: float  # relative RMS error of the packed bytes against the weights
    assumed: float  # the format's error as the planner priced it
    rms: float  # the weights' RMS (small values are the usual cause)


def measure(block: str, tensor: str, fmt_name: str, weight: torch.Tensor, packed: torch.Tensor) -> LossExcess | None:
    """The excess of one packed tensor, or None when its loss is within what the plan assumed (or the format's
    loss is bounded whatever the values: F32, BF16 — an 8-bit mantissa over fp32's whole exponent range)."""
    if fmt_name in ("F32", "BF16") or weight.numel() == 0:
        return None
    w = weight.detach().to("cpu", torch.float32).reshape(weight.shape)  # no copy for an fp32 weight
    err = get_format(fmt_name).dequantize(packed, tuple(w.shape) or (1,), torch.float32).reshape(w.shape)
    norm = torch.linalg.vector_norm(w).item()
    err_norm = torch.linalg.vector_norm(err.sub_(w)).item()  # in place: one temporary
    measured = err_norm / norm if norm > 0 else 0.0
    if not math.isfinite(measured):  # non-finite weights decode as NaN on purpose (eager computes with them)
        return None
    measured = max(measured, _bulk_error(w, err))
    assumed = format_error(fmt_name)
    if measured <= max(EXCESS_FACTOR * assumed, assumed + EXCESS_ABS):
        return None
    return LossExcess(block, tensor, fmt_name, measured, assumed, norm / math.sqrt(w.numel()))


# A weight beyond this many robust standard deviations (1.4826 × the median |w|, which outliers do not move) is an
# outlier: the bulk's error is measured without them. A normal weight set has none past ~6.
OUTLIER_SIGMAS = 10.0
_SAMPLE = 1 << 16  # weights the median is taken over (evenly strided): a whole-tensor median costs ~100 ms at 16 M


def _bulk_error(w: torch.Tensor, err: torch.Tensor) -> float:
    """Relative RMS error of the weights that are not outliers; `err` (the error of `w`, a temporary of the caller's)
    is overwritten. The whole tensor's figure is the outliers' where a few large ones hold most of its norm, while
    the weights sharing their blocks' scales lose nearly everything (0.1 % of a layer's weights at 50, ~1000× its
    RMS: Q6_K measured 0.23 % over the tensor, 13 % on the rest, and the model's output was off by 48 %, no warning).
    The scale is the median of the nonzero |w| (a pruned tensor's zeros would make it 0). Cost: a sampled median
    and one pass to find the outliers; where there are some, a masked copy and two norms (~50-160 ms per 16 M
    weights on one thread, against the seconds a K-quant pack takes)."""
    flat, diff = w.reshape(-1), err.reshape(-1)
    sample = flat[:: max(1, flat.numel() // _SAMPLE)].abs()
    sample = sample[sample > 0]
    if sample.numel() == 0:
        return 0.0
    outliers = flat.abs() > OUTLIER_SIGMAS * 1.4826 * sample.median().item()
    if not bool(outliers.any()):
        return 0.0  # no outliers: the whole tensor's figure is the bulk's
    norm = torch.linalg.vector_norm(flat.masked_fill(outliers, 0.0)).item()
    return torch.linalg.vector_norm(diff.masked_fill_(outliers, 0.0)).item() / norm if norm > 0 else 0.0


def warn_excess(excess: list[LossExcess]) -> None:
    """One PlanWarning naming the worst few tensors (the plan's quality loss did not count them)."""
    if not excess:
        return
    worst = sorted(excess, key=lambda e: -e.measured / max(e.assumed, 1e-12))
    shown = "; ".join(f"{e.block}.{e.tensor} in {e.format} loses {e.measured:.1%} where {e.assumed:.1%} was assumed "
                      f"(weights RMS {e.rms:.1e})" for e in worst[:3])
    more = f"; and {len(worst) - 3} more tensors" if len(worst) > 3 else ""
    warnings.warn(f"packed weights lose far more than the plan assumed: {shown}{more}. The plan's quality loss does "
                  "not count this: values this small (or outliers this large) fall outside what the format's scales "
                  "hold. A larger vram budget keeps such blocks in a float format (or give a plan that does: plan=)",
                  PlanWarning, stacklevel=user_stacklevel())
