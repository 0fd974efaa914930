"""What one measurement run of a backend found, and the one assembly of it into a measured DeviceProfile.

`measure_cpu` and `measure_cuda` time different things in different ways; both hand their numbers over as a
`Measurements` with a provenance table (field → how it was measured), and `to_profile` adds what every
measured profile records alike: torch's versions, the date, and the command that measured it. Both time
interference with the same block-shaped probe (`block_probe`) and reduce it alike (`slowdowns`).
"""

from __future__ import annotations

import datetime
import itertools
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

import torch

from residency.device.profile import MAX_SLOWDOWN, Curve, DeviceProfile, Provenance

# Every field a measurement records how it measured: a profile missing one would show a blank provenance.
PROVENANCE_FIELDS = frozenset({
    "memory", "link", "device_memory_gbps", "matmul_tflops", "dequant_gweights_per_s", "copy_compute_overlap",
    "launch_overhead_us", "matmul_small_tflops", "elementwise_gelems_per_s", "copy_slowdown", "compute_slowdown",
})
# Fields only some backends measure (the CPU: attention and conv curves, the re-warm after a matmul); each one
# measured records how.
OPTIONAL_PROVENANCE_FIELDS = frozenset({"attention_tflops", "conv_tflops", "matmul_rewarm_us", "dequant_call_us",
                                        "dequant_tensor_gweights_per_s", "dequant_fresh_factor"})
# An unpack timed on a small matrix, beside the rate's large one, gives its per-call cost: 16 rows of 256 weights,
# a whole number of blocks of every format (K-quants' 256), small enough that the call costs more than the weights.
DEQUANT_SMALL_SHAPE = (16, 256)


@dataclass(frozen=True)
class Measurements:
    """One backend's measured numbers, in DeviceProfile's units (see its field comments)."""

    name: str  # the device as the user knows it: "NVIDIA H200", "AMD EPYC 7B13 (2 cores)"
    vendor: str  # "NVIDIA", "AMD", "cpu"
    backend: str  # "cuda" | "rocm" | "cpu"
    driver: str  # driver version where readable, else ""
    memory_total_bytes: int
    memory_reserve_bytes: int
    memory_usable_bytes: int
    link: dict[str, Curve]  # GB/s over transfer bytes, keyed by LINK_DIRECTIONS
    device_memory_gbps: float  # read + write bytes of a device-memory copy
    matmul_tflops: dict[str, Curve]  # compute dtype -> TFLOP/s over token rows, matmul_weight_dim² weight
    matmul_weight_dim: int
    matmul_small_tflops: dict[str, Curve]  # the same for a matmul_small_weight_dim² weight
    matmul_small_weight_dim: int
    dequant_gweights_per_s: dict[str, float]  # storage format -> 1e9 weights/s unpacked
    copy_compute_overlap: float  # 0..1, timing.overlap_fraction
    copy_slowdown: float  # ≥ 1: a copy's time beside the block probe over its time alone
    compute_slowdown: float  # ≥ 1: the block probe's time beside copies over its time alone
    launch_overhead_us: float  # per kernel launch (GPU) or dispatched op (CPU)
    elementwise_gelems_per_s: Curve  # 1e9 activation elements/s over the size class of an op's tensors
    compute_threads: int  # CPU: intra-op threads of compute; 0 on a GPU
    attention_tflops: dict[str, Curve] = field(default_factory=dict)  # dtype -> SDPA TFLOP/s over query rows
    conv_tflops: dict[str, Curve] = field(default_factory=dict)  # dtype -> 3×3 conv2d TFLOP/s over kernel elements
    matmul_rewarm_us: Curve | None = None  # CPU: µs lost after a matmul, over its weight's elements
    dequant_call_us: dict[str, float] = field(default_factory=dict)  # storage format -> µs per unpack call
    # CPU: storage format -> 1e9 weights/s of one unpack call over its tensor's weights, the call included
    dequant_tensor_gweights_per_s: dict[str, Curve] = field(default_factory=dict)
    # CPU: storage format -> an unpack's time from a just-copied input over its time from DRAM
    dequant_fresh_factor: dict[str, float] = field(default_factory=dict)


def dequant_rate_and_call(large_weights: int, large_s: float, small_weights: int, small_s: float) -> tuple[float, float]:
    """(1e9 weights/s, µs per call) of an unpack timed at two sizes, as t = call + weights ÷ rate through both.
    A small call timed no slower per weight than the large one (noise) gives call 0 and the large one's rate."""
    per_weight = (large_s - small_s) / (large_weights - small_weights) if large_weights > small_weights else 0.0
    call_s = small_s - small_weights * per_weight
    if per_weight <= 0 or call_s <= 0:
        return large_weights / large_s / 1e9, 0.0
    return 1e-9 / per_weight, call_s * 1e6


def to_profile(m: Measurements, source: str, how: Mapping[str, str]) -> DeviceProfile:
    """The DeviceProfile of `m`; each field's provenance is `source` (the command) and `how[field]`.

    Raises ValueError when `how` does not cover exactly PROVENANCE_FIELDS and the optional fields `m` measured (a
    programming error)."""
    measured = {k for k in OPTIONAL_PROVENANCE_FIELDS if getattr(m, k) is not None and getattr(m, k) != {}}
    expected = PROVENANCE_FIELDS | measured
    if set(how) != expected:
        raise ValueError(f"provenance table: missing {sorted(expected - set(how))}, "
                         f"unknown {sorted(set(how) - expected)}")
    return DeviceProfile(
        **{f.name: getattr(m, f.name) for f in fields(m)},  # shallow: asdict would turn the Curves into dicts
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda or "",
        hip_version=getattr(torch.version, "hip", None) or "",
        date=datetime.date.today().isoformat(),
        provenance={key: Provenance("measured", f"{source} — {note}") for key, note in how.items()},
    )


# ---------------------------------------------------------------- the interference probe
PROBE_WEIGHTS = 4  # per block call: query and output projections, MLP up and down, each dim × dim


@dataclass(frozen=True)
class ProbeShape:
    """One block call's worth of work: few-row matmuls, attention of those rows over a KV window, norms, a GELU
    and residual adds, as a causal world model's block runs per latent frame."""

    dim: int  # model width; every weight is dim × dim
    rows: int  # token rows of the matmuls (a latent frame's tokens)
    kv_tokens: int  # cached tokens the rows attend to
    head_dim: int  # divides dim
    weight_sets: int  # distinct weight sets cycled through, so that weights come from memory, not a cache


def block_probe(shape: ProbeShape, device: torch.device, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A callable that runs one block-shaped call on `device` in `dtype` (asynchronously on a GPU); each call
    takes the next weight set. Allocates weight_sets·4·dim² weights plus a K and a V of kv_tokens·dim."""
    dim, rows, heads = shape.dim, shape.rows, shape.dim // shape.head_dim
    bound = dim ** -0.5  # unit-scale activations through every layer: no overflow in bf16, no denormals
    sets = [torch.empty(PROBE_WEIGHTS, dim, dim, device=device, dtype=dtype).uniform_(-bound, bound)
            for _ in range(shape.weight_sets)]
    k, v = (torch.randn(1, heads, shape.kv_tokens, shape.head_dim, device=device, dtype=dtype) for _ in range(2))
    x = torch.randn(1, rows, dim, device=device, dtype=dtype)
    cycle = itertools.cycle(sets)
    functional = torch.nn.functional

    def call() -> torch.Tensor:
        w = next(cycle)
        q = functional.linear(functional.layer_norm(x, (dim,)), w[0]).view(1, rows, heads, -1).transpose(1, 2)
        attended = functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, rows, dim)
        h = x + functional.linear(attended, w[1])
        return h + functional.linear(functional.gelu(functional.linear(functional.layer_norm(h, (dim,)), w[2])), w[3])

    return call


def calls_during(calls_s: list[tuple[float, float]], window_s: tuple[float, float]) -> list[float]:
    """Durations [s] of the (start, end) calls that ran wholly inside `window_s` (start, end), on one clock;
    when none did (a window shorter than a call), of those that overlapped it."""
    lo, hi = window_s
    inside = [e - s for s, e in calls_s if s >= lo and e <= hi]
    return inside or [e - s for s, e in calls_s if s < hi and e > lo]


def slowdowns(copy_alone_s: list[float], copy_together_s: list[float], call_alone_s: list[float],
              call_together_s: list[float]) -> tuple[float, float]:
    """(copy_slowdown, compute_slowdown): median time beside the other engine over median time alone, each
    clamped to [1, MAX_SLOWDOWN] (below 1 is noise: neither engine speeds up beside the other).

    Raises statistics.StatisticsError when a list is empty."""
    def ratio(alone: list[float], together: list[float]) -> float:
        base = statistics.median(alone)
        return 1.0 if base <= 0 else min(MAX_SLOWDOWN, max(1.0, statistics.median(together) / base))

    return ratio(copy_alone_s, copy_together_s), ratio(call_alone_s, call_together_s)
