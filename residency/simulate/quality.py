"""Quality loss of a plan: Σ over blocks of sensitivity × the error of the block's storage format, plus the KV
cache's error where the plan stores it in another dtype than the workload's.

Default sensitivity is 1 and the error is the format's relative RMS weight error, measured here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cache, lru_cache

import torch

from residency.formats import FORMATS
from residency.formats.base import relative_rms_error
from residency.formats.dtypes import KV_TORCH_DTYPES
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


# Formats that hold every value of a weights dtype exactly: storing such weights in them loses nothing.
_EXACT_FOR = {"fp32": ("F32",), "bf16": ("BF16", "F32"), "fp16": ("F16", "F32")}


def _error(name: str, weights_dtype: str | None) -> float:
    """The format's error on weights held in `weights_dtype` (None: fp32 or unknown, the probe's own)."""
    return 0.0 if name in _EXACT_FOR.get(weights_dtype or "", ()) else format_error(name)


def block_error(workload: Workload, block: str, fmt: str) -> float:
    """Weights-weighted error against the weights as the model holds them: tensors that fall back to BF16 carry
    BF16's error, tensors kept in their own dtype (BlockSpec.own_dtypes) none (they are stored as they are),
    and a format that holds the model's weights dtype exactly (BF16 for a bf16 model, its weights_dtype in
    Workload.extra as residency.workload.from_module records it) none. Without that record the weights are taken
    as fp32 (the catalog's: the shipped world model trains in fp32)."""
    spec = workload.by_name[block]
    if spec.params == 0:
        return 0.0
    held = workload.extra.get("weights_dtype") if isinstance(workload.extra, Mapping) else None
    q = spec.quantized_weights(fmt)
    kept = sum(math.prod(shape) for (_, shape), own in zip(spec.tensors, spec.tensor_own_dtypes, strict=True)
               if own) if spec.own_dtypes else 0
    fallback = spec.params - q - kept
    rest = _error("BF16", held) if fallback else 0.0
    return (q * (_error(fmt, held) if q else 0.0) + fallback * rest) / spec.params


# The row of a sensitivity table that holds the KV cache's measured loss per KV dtype ({"fp8": …}); no block is
# named so (block names are module paths).
KV_SENSITIVITY_KEY = "kv_cache"
_FP8_MAX = 448.0  # largest finite e4m3: the caches clamp to it on write (e4m3fn has no inf)


@cache
def kv_dtype_error(kv_dtype: str, held: str) -> float:
    """Relative RMS error of storing values computed for a `held` cache (the workload's KV dtype) in `kv_dtype`,
    on the probe matrix (heavy-tailed, as attention keys and values are); 0 where `kv_dtype` holds every `held`
    value (the same dtype, or fp32). Stored as the caches do: fp8 is e4m3 at unit scale, clamped to ±448."""
    if kv_dtype == held or kv_dtype == "fp32":
        return 0.0
    values = _probe().to(KV_TORCH_DTYPES[held]).float()
    stored = values.clamp(-_FP8_MAX, _FP8_MAX) if kv_dtype == "fp8" else values
    return relative_rms_error(values, stored.to(KV_TORCH_DTYPES[kv_dtype]).float())


def kv_loss(workload: Workload, kv_dtype: str, sensitivity: Mapping[str, Mapping[str, float]] | None = None) -> float:
    """The quality loss of a KV cache stored in `kv_dtype`: the measured `sensitivity["kv_cache"][kv_dtype]` when
    given, else the proxy — a relative error e in a block's cached K and V is what the same error in its K and V
    projections' weights gives, and the weights proxy counts that as e × their share of the block's weights, taken
    as (K+V channels)² / 2 over the block's parameters (d_model = K channels, as in multi-head attention; under
    grouped KV heads the projections shrink with the KV channels and this with their square: an understatement by
    the KV channels' share of d_model). 0 for a workload without a KV cache, or at its own dtype.
    On the shipped world model (4 blocks with a cache; tools/measure_sensitivity.py, rollouts against its BF16
    cache, in the table's units) FP8 measured 0.019 where the proxy says 0.0094: within a factor of two."""
    if not workload.kv_cache_bytes():
        return 0.0
    measured = sensitivity.get(KV_SENSITIVITY_KEY, {}).get(kv_dtype) if sensitivity else None
    if measured is not None:
        return measured
    err = kv_dtype_error(kv_dtype, workload.kv_dtype)
    if not err:
        return 0.0
    return err * sum(min(1.0, b.kv_channels_per_token ** 2 / 2 / b.params) if b.params else 1.0
                     for b in workload.blocks if b.kv_channels_per_token)


def weights_loss(workload: Workload, plan: Plan, sensitivity: Mapping[str, Mapping[str, float]] | None = None) -> float:
    """Σ blocks sensitivity × error of the block's format. `sensitivity[block][format]`, when given, replaces the
    product."""
    total = 0.0
    for bp in plan.blocks:
        measured = sensitivity.get(bp.name, {}).get(bp.format) if sensitivity else None
        total += measured if measured is not None else block_error(workload, bp.name, bp.format)
    return total


def quality_loss(workload: Workload, plan: Plan, sensitivity: Mapping[str, Mapping[str, float]] | None = None) -> float:
    """The weights' loss (weights_loss) plus the KV cache's at the plan's KV dtype (kv_loss)."""
    return weights_loss(workload, plan, sensitivity) + kv_loss(workload, plan.kv_dtype, sensitivity)
