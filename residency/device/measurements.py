"""What one measurement run of a backend found, and the one assembly of it into a measured DeviceProfile.

`measure_cpu` and `measure_cuda` time different things in different ways; both hand their numbers over as a
`Measurements` with a provenance table (field → how it was measured), and `to_profile` adds what every
measured profile records alike: torch's versions, the date, and the command that measured it.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

from residency.device.profile import Curve, DeviceProfile, Provenance

# Every field a measurement records how it measured: a profile missing one would show a blank provenance.
PROVENANCE_FIELDS = frozenset({
    "memory", "link", "device_memory_gbps", "matmul_tflops", "dequant_gweights_per_s", "copy_compute_overlap",
    "launch_overhead_us", "matmul_small_tflops", "elementwise_gelems_per_s",
})


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
    launch_overhead_us: float  # per kernel launch (GPU) or dispatched op (CPU)
    elementwise_gelems_per_s: Curve  # 1e9 activation elements/s over the size class of an op's tensors
    compute_threads: int  # CPU: intra-op threads of compute; 0 on a GPU


def to_profile(m: Measurements, source: str, how: Mapping[str, str]) -> DeviceProfile:
    """The DeviceProfile of `m`; each field's provenance is `source` (the command) and `how[field]`.

    Raises ValueError when `how` does not cover exactly PROVENANCE_FIELDS (a programming error)."""
    if set(how) != PROVENANCE_FIELDS:
        raise ValueError(f"provenance table: missing {sorted(PROVENANCE_FIELDS - set(how))}, "
                         f"unknown {sorted(set(how) - PROVENANCE_FIELDS)}")
    return DeviceProfile(
        **{f.name: getattr(m, f.name) for f in fields(m)},  # shallow: asdict would turn the Curves into dicts
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda or "",
        hip_version=getattr(torch.version, "hip", None) or "",
        date=datetime.date.today().isoformat(),
        provenance={key: Provenance("measured", f"{source} — {note}") for key, note in how.items()},
    )
