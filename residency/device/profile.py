"""DeviceProfile: the planner's picture of one machine — memory, link curves, compute and dequant rates.

Every number carries its provenance (measured with a command, or datasheet with source and derating).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cached_property

from residency.units import BACKENDS  # noqa: F401  (re-exported: device code and tests import it from here)

COMPUTE_DTYPES = ("bf16", "fp16", "fp32")
LINK_DIRECTIONS = ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable")
PROVENANCE_KINDS = ("measured", "datasheet", "calibrated")
# What the execution modes of a block cost (residency.simulate.costs.compute_s); 0 = not known, and the planner
# then keeps blocks eager (a block forced to another mode is costed as eager).
EXEC_MODE_FIELDS = ("graph_replay_us_per_kernel", "compiled_dispatch_fraction", "compile_s_per_block_class",
                    "graph_pool_bytes_per_class")
# Refinements a measured (or calibrated) profile may add; absent (at their defaults) in datasheet and older
# profiles, which therefore keep their fingerprints.
OPTIONAL_FIELDS = ("matmul_weight_dim", "matmul_small_tflops", "matmul_small_weight_dim", "elementwise_gelems_per_s",
                   "attention_tflops", "conv_tflops", "matmul_rewarm_us", "dequant_call_us", "dequant_tensor_gweights_per_s",
                   "dequant_fresh_factor",
                   "copy_slowdown",
                   "compute_slowdown", "compute_scale", "call_host_us", "streamed_call_host_us", "calibration", *EXEC_MODE_FIELDS)
# Bounds of a measured slowdown factor: 1 = no interference; a copy or compute 10× slower beside the other
# engine would be a broken measurement, not a device.
MAX_SLOWDOWN = 10.0


@dataclass(frozen=True)
class Provenance:
    """Where a profile's figures come from: a measurement, or a datasheet derated by a stated rule."""
    kind: str  # "measured" | "datasheet"
    source: str  # the command that measured it, or the spec page / document it came from
    derating: str = ""  # how a datasheet peak became an achievable figure ("" when measured)


@dataclass(frozen=True)
class Calibration:
    """Where a calibrated profile's compute_scale came from: a base profile and a run of one workload on it."""
    base_fingerprint: str  # fingerprint of the profile the calibration started from
    workload_fingerprint: str  # the workload whose run was timed
    model: str  # its catalog name or path, as the user gave it
    frames: int  # latent frames timed
    date: str  # ISO date of the run
    note: str = ""  # free text: the command, the machine's state


@dataclass(frozen=True)
class Curve:
    """A rate sampled at increasing sizes; log-size interpolation between samples, flat beyond them.

    Used for link bandwidth over transfer size (x = bytes, y = GB/s) and matmul throughput over
    token rows (x = rows, y = TFLOP/s).
    """

    x: tuple[float, ...]  # increasing, > 0
    y: tuple[float, ...]  # > 0, same length
    spread: tuple[float, ...] = ()  # (p90 - p10) / median of each sample when measured; () for datasheet

    def at(self, x: float) -> float:
        """The rate at size `x`, interpolated in log x between samples; the end samples' rates beyond them."""
        xs, ys = self.x, self.y
        if x <= xs[0]:
            return ys[0]
        if x >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, x)
        lo, hi = math.log(xs[i - 1]), math.log(xs[i])
        w = (math.log(x) - lo) / (hi - lo)
        return ys[i - 1] + w * (ys[i] - ys[i - 1])


def tensor_unpack_s(curve: Curve, weights: float) -> float:
    """Seconds of one unpack call over a tensor of `weights` weights, from a curve of 1e9 weights/s over tensor
    weights: linear in weights between the samples' times, through the call cost the first two imply below the
    first (at least 0, at most the first's time), and on at the first-to-last slope beyond the last (the two
    samples dequant_rate_and_call fits the rate from: over a 2000× span the noise of one sample hardly moves it,
    where a slope between the last two could halve a large tensor's cost)."""
    xs, times = curve.x, _unpack_times(curve)
    if weights >= xs[-1]:
        slope = (times[-1] - times[0]) / (xs[-1] - xs[0]) if len(xs) > 1 else 0.0
        return times[-1] + (weights - xs[-1]) * (slope if slope > 0 else times[-1] / xs[-1])
    if weights <= xs[0]:
        slope = (times[1] - times[0]) / (xs[1] - xs[0]) if len(xs) > 1 else times[0] / xs[0]
        call = min(max(times[0] - slope * xs[0], 0.0), times[0])
        return call + (times[0] - call) * weights / xs[0]
    i = bisect.bisect_right(xs, weights)
    w = (weights - xs[i - 1]) / (xs[i] - xs[i - 1])
    return times[i - 1] + w * (times[i] - times[i - 1])


@functools.lru_cache(maxsize=256)
def _unpack_times(curve: Curve) -> tuple[float, ...]:
    """Seconds of one call at each sample, never more than at a larger one: timing noise only slows a sample (a
    median of a few runs on a busy machine), so a small sample slower than a larger one takes the larger's time
    (a running maximum from below would pass one slow 4 K sample on to every tensor up to it; the planner asks
    this for every candidate: cached)."""
    times, least = [], math.inf
    for x, y in zip(reversed(curve.x), reversed(curve.y), strict=True):
        least = min(least, x / (y * 1e9))
        times.append(least)
    return tuple(reversed(times))


@dataclass(frozen=True)
class DeviceProfile:
    """The planner's numbers for one device: memory [bytes], link curves [GB/s over transfer bytes], matmul
    [TFLOP/s], dequant [1e9 weights/s] and elementwise [1e9 elements/s] rates, copy/compute overlap (and, when
    measured, each engine's slowdown beside the other) and launch cost [us], each with its provenance (measured,
    a datasheet value and its derating, or calibrated against a run).

    Made by residency.machine_profile (this machine, measured once), load_profile (shipped or saved) or
    `residency profile`; frozen, validated when read.
    """

    # --- identity ---
    name: str  # "Radeon RX 7800 XT", "cpu (2 cores)"
    vendor: str  # "AMD", "NVIDIA", "cpu"
    backend: str  # "cuda" | "rocm" | "cpu"
    torch_version: str  # torch that measured it; "" for datasheet profiles
    cuda_version: str  # torch.version.cuda, "" when none
    hip_version: str  # torch.version.hip, "" when none
    driver: str  # driver version where readable, else ""
    date: str  # ISO date the numbers were measured or looked up
    # --- memory ---
    memory_total_bytes: int  # device memory (CPU backend: the budgetable RAM)
    memory_reserve_bytes: int  # kept free for the driver, other apps, fragmentation
    memory_usable_bytes: int  # free at measurement time minus the reserve
    # --- transfers: GB/s (1e9 B/s) over transfer size in bytes ---
    link: dict[str, Curve]  # keys: LINK_DIRECTIONS
    device_memory_gbps: float  # device-memory read+write bandwidth, GB/s
    # --- compute ---
    matmul_tflops: dict[str, Curve]  # compute dtype -> TFLOP/s over token rows (weight matrix dim×dim)
    dequant_gweights_per_s: dict[str, float]  # storage format -> 1e9 weights/s dequantized on the device
    copy_compute_overlap: float  # fraction of a side-stream copy hidden under concurrent compute, 0..1
    launch_overhead_us: float  # per kernel launch (CPU: per torch op dispatch), µs
    compute_threads: int = 0  # CPU backend: intra-op threads of compute (one core left to the copy engine)
    provenance: dict[str, Provenance] = field(default_factory=dict)  # top-level field -> where it came from
    # --- optional refinements (0 / {} when not measured: the cost model falls back as documented) ---
    matmul_weight_dim: int = 0  # the matmul_tflops curves' weight is dim × dim
    # the same curves for a small dim × dim weight: few-row matmuls on small matrices run slower (on this
    # CPU 35 vs 49 GFLOP/s at 16 rows, 256² vs 1024², both from DRAM); rates between interpolate on log size
    matmul_small_tflops: dict[str, Curve] = field(default_factory=dict)
    matmul_small_weight_dim: int = 0
    # 1e9 activation elements/s read + written by non-matmul ops (norms, elementwise, copies), counted as
    # residency.workload.op_count counts them, over the size class of an op's largest tensor (x: elements);
    # None: derived from device_memory_gbps at the compute dtype's size
    elementwise_gelems_per_s: Curve | None = None
    # compute dtype -> TFLOP/s of fused attention (scaled_dot_product_attention, 64-wide heads) over query rows;
    # a dtype without a curve: attention FLOPs at the matmul rate. On this CPU attention runs at 60-90 GFLOP/s
    # in fp32 where a 256-row matmul runs at ~140 (256 and 288 tokens, 8 heads; measured, issue 16)
    attention_tflops: dict[str, Curve] = field(default_factory=dict)
    # compute dtype -> TFLOP/s of a 3×3 conv2d over its kernel's elements (C_out·C_in·9), at a fixed image size;
    # a dtype without a curve: conv FLOPs at the matmul rate. On this EPYC (1 thread, fp32) a 16→3-channel conv on
    # 64×64 pixels ran at 12.6 GFLOP/s and 64→64 on 16×16 at 63, where the matmul model gave ~64 and ~90: a VAE's
    # thin convs were predicted 2-5× too fast
    conv_tflops: dict[str, Curve] = field(default_factory=dict)
    # CPU: µs the ops after a matmul lose re-filling the caches its weight evicted (the interpreter's and the
    # dispatcher's working set comes back from memory), over the weight's elements; None: not measured, 0.
    # Measured here: 120-250 µs after a 1024² fp32 weight, 10-30 µs after a 256² one (more under load)
    matmul_rewarm_us: Curve | None = None
    # storage format -> µs one unpack call costs beyond its weights' time (dispatching its torch ops on the CPU,
    # launching its kernels on a GPU), so a block of many small tensors dequantizes slower per weight than the
    # large matrix the rate is timed on ({} = not measured: 0). Measured on this EPYC: 140 µs a Q8_0 call and
    # 400 a Q4_K one, where tiny's DiT block (7 matrices, 14 vectors) took 2.7 ms against 1.7 predicted by rate
    dequant_call_us: dict[str, float] = field(default_factory=dict)
    # storage format -> 1e9 weights/s of one unpack call over its tensor's weights (x), the call's cost included,
    # the packed tensor read from DRAM and its output reused, as a streamed block's tensors unpack ({} = not
    # measured: rate and call cost above). A tensor's time is interpolated between the samples (linear in
    # weights), so one call costs what a tensor of its size measured: on this EPYC (1 thread, Q8_0) 2.0 Gw/s at
    # 64K weights, 3.8 at 256K, 4.9 at 1M and 3.6 at 8M (the output no longer fits the caches), where the
    # rate-and-call model, timed at 8M, predicted a tiny DiT block's unpack 40 % slow (0.59 ms against 0.42)
    dequant_tensor_gweights_per_s: dict[str, Curve] = field(default_factory=dict)
    # CPU: storage format -> an unpack's time when its packed input was just copied (a streamed block's slot, in the
    # cache) over its time from DRAM (the curve's), at the curve's middle size ({} = not measured: 1.0). Measured on
    # this EPYC at 256 K weights: Q8_0 0.94, BF16 0.78-0.88, Q4_K 0.98 (at 1 M weights: 0.90, 0.71, 0.99)
    dequant_fresh_factor: dict[str, float] = field(default_factory=dict)
    # Interference, per engine: factor (≥ 1) by which a copy's time grows while compute runs, and compute's while
    # a copy runs; 0 = not measured, the symmetric model of copy_compute_overlap applies (see *_slowdown_factor)
    copy_slowdown: float = 0.0
    compute_slowdown: float = 0.0
    # multiplier on the predicted compute seconds of a block's calls, set by a calibration: keyed by block
    # ("dit.blocks.7"), block class ("dit.blocks.*") or component ("dit"), the most specific first; a block none
    # names (and {}) is 1.0 — residency.simulate.costs.compute_scale_of
    compute_scale: dict[str, float] = field(default_factory=dict)
    # host time between block calls that no block's cost holds (µs), set by a calibration (0 = none): per call
    # of any block (the hooks' bookkeeping, the model's own code between blocks), and more per streamed call
    # (the slot's rebinding and the hand-off to the copy thread)
    call_host_us: float = 0.0
    streamed_call_host_us: float = 0.0
    # provenance of a calibrated profile; like provenance and date, outside the fingerprint
    calibration: Calibration | None = None
    # --- execution modes (BlockPlan.exec_mode; 0 = not known) ---
    # GPU: host µs per kernel of a block replayed as one captured CUDA/HIP graph (eager: launch_overhead_us)
    graph_replay_us_per_kernel: float = 0.0
    # kernel launches (GPU) or op dispatches (CPU) a torch.compile'd block still pays, as a fraction of eager's:
    # inductor fuses chains of pointwise ops into one kernel, matmuls stay library calls. Not set for the CPU:
    # tools/bench_compile.py measured compiled/eager 0.84-1.26x on this CPU, no gain to claim by default
    compiled_dispatch_fraction: float = 0.0
    # seconds to compile one block class the first time on this machine (then read from inductor's disk cache)
    compile_s_per_block_class: float = 0.0
    # GPU: device bytes a graphed block class holds beyond its activations (its private allocator pool's
    # segment rounding and the graph's own state)
    graph_pool_bytes_per_class: int = 0

    # --- derived figures the cost model uses ---
    def h2d_gbps(self, nbytes: int, pinned: bool = True) -> float:
        """Host->device GB/s for one transfer of `nbytes`, from pinned or pageable host memory.

        Raises KeyError when the profile has no curve for that kind of host memory.
        """
        return self.link["h2d_pinned" if pinned else "h2d_pageable"].at(max(nbytes, 1))

    def h2d_s(self, nbytes: int, pinned: bool = True) -> float:
        """Seconds to move `nbytes` host→device in one transfer."""
        return 0.0 if nbytes <= 0 else nbytes / (self.h2d_gbps(nbytes, pinned) * 1e9)

    def matmul_tflops_at(self, rows: int, dtype: str, weight_elements: int = 0) -> float:
        """TFLOP/s at `rows` token rows against a weight of `weight_elements` (0: the measured size)."""
        large = self.matmul_tflops[dtype].at(max(rows, 1))
        small_curve = self.matmul_small_tflops.get(dtype)
        if small_curve is None or weight_elements <= 0 or not self.matmul_weight_dim:
            return large
        lo, hi = self.matmul_small_weight_dim ** 2, self.matmul_weight_dim ** 2
        if weight_elements >= hi:
            return large
        small = small_curve.at(max(rows, 1))
        if weight_elements <= lo:
            return small
        w = (math.log(weight_elements) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return small + w * (large - small)

    def matmul_s(self, flops: float, rows: int, dtype: str, weight_elements: int = 0) -> float:
        """Seconds for `flops` of matmul at `rows` token rows in `dtype` (see matmul_tflops_at).

        Raises KeyError for a dtype the profile has no matmul curve for.
        """
        return flops / (self.matmul_tflops_at(rows, dtype, weight_elements) * 1e12)

    def attention_s(self, flops: float, rows: int, dtype: str) -> float:
        """Seconds for `flops` of attention (scores and weighted sum) at `rows` query rows in `dtype`: the profile's
        attention curve, else the matmul rate at those rows (KeyError for a dtype with neither)."""
        curve = self.attention_tflops.get(dtype)
        if curve is None:
            return self.matmul_s(flops, rows, dtype)
        return flops / (curve.at(max(rows, 1)) * 1e12)

    def conv_s(self, flops: float, kernel_elements: int, rows: int, dtype: str) -> float:
        """Seconds for `flops` of a conv2d whose kernel has `kernel_elements` weights, over `rows` output pixels, in
        `dtype`: the profile's conv curve, else the matmul rate of a weight that size at those rows (KeyError for a
        dtype with neither)."""
        curve = self.conv_tflops.get(dtype)
        if curve is None:
            return self.matmul_s(flops, rows, dtype, kernel_elements)
        return flops / (curve.at(max(kernel_elements, 1)) * 1e12)

    def rewarm_s(self, weight_elements: int) -> float:
        """CPU: seconds the ops following a matmul over a weight of `weight_elements` lose to the caches it
        evicted (0 when not measured, and on a GPU, whose host code does not share the caches with its kernels)."""
        if self.matmul_rewarm_us is None or self.is_gpu:
            return 0.0
        return self.matmul_rewarm_us.at(max(weight_elements, 1)) * 1e-6

    def elementwise_s(self, elements: float, element_bytes: int, size_class: int = 0) -> float:
        """Seconds for non-matmul ops to read and write `elements` activation elements whose largest tensor
        is of `size_class` elements (0: unknown, the smallest measured class)."""
        if self.elementwise_gelems_per_s is not None:
            # measured at the backend's own dtype (fp32 on the CPU, bf16 on a GPU). A GPU moves half the bytes
            # for half the width; a CPU's bf16/fp16 non-matmul ops convert through fp32 and are no faster per
            # element (the shipped model's DiT block: 1.69 ms in bf16 against 1.74 in fp32, where halving its
            # elementwise time predicted 1.34 ms)
            scale = max(element_bytes / 4, 1.0) if self.backend == "cpu" else element_bytes / 2
            return elements * scale / (self.elementwise_gelems_per_s.at(max(size_class * scale, 1)) * 1e9)
        return elements * element_bytes / (self.device_memory_gbps * 1e9)

    def copy_slowdown_factor(self) -> float:
        """Factor (≥ 1) by which a copy's time grows while compute runs: the measured copy_slowdown, else the
        symmetric model's 2 − o (o = copy_compute_overlap clamped to [0, 1]: both engines run at rate 1/(2 − o))."""
        return self.copy_slowdown if self.copy_slowdown > 0 else _symmetric_slowdown(self.copy_compute_overlap)

    def compute_slowdown_factor(self) -> float:
        """Factor (≥ 1) by which compute's time grows while a copy runs: the measured compute_slowdown, else the
        symmetric model's 2 − o, as copy_slowdown_factor."""
        return self.compute_slowdown if self.compute_slowdown > 0 else _symmetric_slowdown(self.copy_compute_overlap)

    def dequant_s(self, weights: int, fmt: str, calls: int = 0, tensor_weights: tuple[tuple[int, int], ...] = ()
                  ) -> float:
        """Seconds to dequantize `weights` weights stored in `fmt` in `calls` unpack calls (one per tensor; 0: the
        rate alone). With a per-tensor curve for `fmt` and the calls' `tensor_weights` ((tensor weights, count), as
        BlockSpec.dequant_work gives them), each call costs its tensor's size as measured (tensor_unpack_s); without
        the sizes, the rate and call cost. KeyError for a format not profiled."""
        curve = self.dequant_tensor_gweights_per_s.get(fmt)
        if curve is not None and tensor_weights:
            return sum(count * tensor_unpack_s(curve, n) for n, count in tensor_weights)
        return weights / (self.dequant_gweights_per_s[fmt] * 1e9) + calls * self.dequant_call_us.get(fmt, 0.0) * 1e-6

    def fingerprint(self) -> str:
        """Changes when any number of the profile changes (identity, provenance text and calibration record
        excluded). Optional fields left at their defaults are left out, so adding one kept every older profile's
        fingerprint."""
        return self._fingerprint

    @cached_property
    def _fingerprint(self) -> str:
        # once per profile (frozen; its dicts are never changed in place, a calibration makes a new profile):
        # every plan the planner builds records it, ~5 ms of JSON a time
        defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory()
                    for f in fields(self) if f.name in OPTIONAL_FIELDS}
        doc = {k: v for k, v in asdict(self).items()
               if k not in ("provenance", "date", "driver", "calibration") and not (k in defaults and v == defaults[k])}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def graph_known(self) -> bool:
        """True when a GPU profile has the graph replay cost, so `graphed` can be costed and planned."""
        return self.is_gpu and self.graph_replay_us_per_kernel > 0

    def compiled_known(self) -> bool:
        """True when the profile has the dispatch a compiled block still pays, so `compiled` can be planned."""
        return self.compiled_dispatch_fraction > 0

    @property
    def is_gpu(self) -> bool:
        """True for a CUDA or ROCm profile (copy engine and kernels run beside the host)."""
        return self.backend in ("cuda", "rocm")


def _symmetric_slowdown(overlap: float) -> float:
    """2 − o, o clamped to [0, 1]: with both engines at rate 1/(2 − o), a copy C and a compute K started together
    end after max(C, K) + (1 − o)·min(C, K), the overlap o as measured (timing.overlap_fraction)."""
    return 2.0 - min(max(overlap, 0.0), 1.0)
