"""Quality loss of a plan: Σ over blocks of sensitivity × the error of the block's storage format.

Default sensitivity is 1 and the error is the format's relative RMS weight error, measured here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cache, lru_cache

import torch

from residency.formats import FORMATS
from residency.formats.base import relative_rms_error
from residency.formats.dtypes import DTYPE_FORMAT
from residency.plan.plan import Plan
from residency.workload.spec import Workload

# Probe matrix for the default error: Student-t(ν=5) weights, heavier-tailed than a Gaussian like
# trained weights are. 16×1024 (64 K-quant super-blocks) gives the error to a few percent, and the
# K-quant scale search on it costs ~0.1 s per format; each format is measured on first use only.
_PROBE_SHAPE = (16, 1024)


@lru_cache(maxsize=1)
def _probe() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    normal = torch.randn(_PROBE_SHAPE, generator=gen)
    chi = torch.randn((5,) + _PROBE_SHAPE, generator=gen).pow(2).mean(0)
    return normal / chi.sqrt()  # Student-t with 5 degrees of freedom, from a seeded generator


@cache
def format_error(name: str) -> float:
    """Relative RMS error of a format on the probe matrix (cached per process)."""
    fmt = FORMATS[name]
    if not fmt.can_pack:
        # Dequant-only formats (Q2_K, Q3_K) are never chosen by a planner; when read from a file, bound
        # them by the coarsest packable format of their family, scaled by the missing bits.
        return format_error("Q4_K") * 2 ** (4.5 - fmt.bits_per_weight)
    return relative_rms_error(_probe(), fmt.roundtrip(_probe()))


def format_errors() -> dict[str, float]:
    """Every format's error on the probe matrix."""
    return {name: format_error(name) for name in FORMATS}


def block_error(workload: Workload, block: str, fmt: str) -> float:
    """Weights-weighted error: tensors that fall back to BF16 carry BF16's error, tensors kept in their own
    dtype (BlockSpec.own_dtypes: a bf16 model's fp32 norms) that dtype's (none for fp32)."""
    spec = workload.by_name[block]
    if spec.params == 0:
        return 0.0
    q = spec.quantized_weights(fmt)
    kept = [(math.prod(shape), own) for (_, shape), own in zip(spec.tensors, spec.tensor_own_dtypes, strict=True)
            if own] if spec.own_dtypes else []
    kept_error = sum(n * format_error(DTYPE_FORMAT[own]) for n, own in kept)
    fallback = spec.params - q - sum(n for n, _ in kept)
    rest = format_error("BF16") if fallback else 0.0
    return (q * (format_error(fmt) if q else 0.0) + fallback * rest + kept_error) / spec.params


def quality_loss(workload: Workload, plan: Plan, sensitivity: Mapping[str, Mapping[str, float]] | None = None) -> float:
    """Σ blocks sensitivity × error. `sensitivity[block][format]`, when given, replaces the product."""
    total = 0.0
    for bp in plan.blocks:
        measured = sensitivity.get(bp.name, {}).get(bp.format) if sensitivity else None
        total += measured if measured is not None else block_error(workload, bp.name, bp.format)
    return total
