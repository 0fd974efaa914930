"""Quality loss of a plan: Σ over blocks of sensitivity × the error of the block's storage format.

Default sensitivity is 1 and the error is the format's relative RMS weight error, measured here.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import torch

from residency.formats import FORMATS
from residency.formats.base import relative_rms_error
from residency.plan.plan import Plan
from residency.workload.spec import Workload

# Probe matrix for the default error: Student-t(ν=5) weights, heavier-tailed than a Gaussian like
# trained weights are. 64×1024 keeps the measurement of all formats well under a second.
_PROBE_SHAPE = (64, 1024)


@lru_cache(maxsize=1)
def format_errors() -> dict[str, float]:
    """Relative RMS error of every packable format on the probe matrix (cached per process)."""
    gen = torch.Generator().manual_seed(0)
    normal = torch.randn(_PROBE_SHAPE, generator=gen)
    chi = torch.randn((5,) + _PROBE_SHAPE, generator=gen).pow(2).mean(0)
    w = normal / chi.sqrt()  # Student-t with 5 degrees of freedom, from a seeded generator
    out = {}
    for name, fmt in FORMATS.items():
        if fmt.can_pack:
            out[name] = relative_rms_error(w, fmt.roundtrip(w))
    # Dequant-only formats are never chosen by a planner; when read from a file, bound them by the
    # next coarser packable format we know (Q2_K/Q3_K are coarser than Q4_0).
    out.setdefault("Q3_K", 2.0 * out["Q4_0"])
    out.setdefault("Q2_K", 4.0 * out["Q4_0"])
    return out


def block_error(workload: Workload, block: str, fmt: str) -> float:
    """Weights-weighted error: tensors that fall back to BF16 carry BF16's error."""
    spec = workload.by_name[block]
    errors = format_errors()
    if spec.params == 0:
        return 0.0
    q = spec.quantized_weights(fmt)
    return (q * errors[fmt] + (spec.params - q) * errors["BF16"]) / spec.params


def quality_loss(workload: Workload, plan: Plan, sensitivity: Mapping[str, Mapping[str, float]] | None = None) -> float:
    """Σ blocks sensitivity × error. `sensitivity[block][format]`, when given, replaces the product."""
    total = 0.0
    for bp in plan.blocks:
        measured = sensitivity.get(bp.name, {}).get(bp.format) if sensitivity else None
        total += measured if measured is not None else block_error(workload, bp.name, bp.format)
    return total
