"""The CPU's compute rates, for the CPU profile (measure_cpu.measure_all calls these): matmul by rows and
weight size, fused attention by query rows, the cache re-warm after a matmul, and the per-op dispatch cost
and elementwise rates of the non-matmul op mix. Each runs on the calling thread (compute's), nothing beside it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from residency.device.bench_inputs import MIX_CHANNELS, count_op_mix, op_mix
from residency.device.profile import Curve
from residency.device.timing import repeats_for, time_samples
from residency.formats import TORCH_DTYPES

if TYPE_CHECKING:
    from residency.device.measure_cpu import CpuSchedule

MIB = 2**20


COLD_WEIGHT_BYTES = 96 * MIB
COLD_MAX_ROWS = 256
COLD_MAX_CALL_S = 2e-3


def measure_matmul(dtype: str, schedule: CpuSchedule, dim: int | None = None) -> Curve:
    """TFLOP/s of x (rows × dim) @ Wᵀ (dim × dim, as nn.Linear; dim defaults to the schedule's), W cycling through
    cache-cold weights; rows grow until one call exceeds the cap."""
    dim, tdtype = dim or schedule.matmul_dim, TORCH_DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    cold = max(1, -(-COLD_WEIGHT_BYTES // (dim * dim * torch.tensor([], dtype=tdtype).element_size())))
    weights = [torch.randn(dim, dim, generator=gen).to(tdtype) for _ in range(cold)]
    xs, ys, spread = [], [], []
    for rows in schedule.matmul_rows:
        x = torch.randn(rows, dim, generator=gen).to(tdtype)
        out = torch.empty(rows, dim, dtype=tdtype)
        torch.matmul(x, weights[0].t(), out=out)  # nn.Linear's layout: x @ W.T, W stored (out, in)
        # Timed after a first call: that one pays the library's setup, and deciding on it flipped 1-row
        # points between the cold sweep and a cached weight (7 vs 27 GFLOP/s) from run to run.
        single = time_samples(lambda x=x, out=out: torch.matmul(x, weights[1 % len(weights)].t(), out=out),
                              repeats=3, warmup=0).p10_s
        # Few rows are bound by reading the weight: cycle the cold set. Many rows (or a slow dtype, like
        # fp16 on most CPUs) are bound by FLOPs: one weight suffices, and a sweep would cost seconds.
        count = cold if rows <= COLD_MAX_ROWS and single < COLD_MAX_CALL_S else 1

        def sweep(x=x, out=out, use=weights[:count]) -> None:
            for w in use:
                torch.matmul(x, w.t(), out=out)

        t0 = time.perf_counter()
        sweep()
        first = time.perf_counter() - t0
        t = time_samples(sweep, repeats_for(first, schedule.matmul_point_s, lo=3, hi=30), warmup=0)
        xs.append(float(rows))
        ys.append(2.0 * rows * dim * dim * count / t.median_s / 1e12)
        spread.append(round(t.spread, 4))
        if first / count > schedule.matmul_max_call_s:
            break
    return Curve(tuple(xs), tuple(ys), tuple(spread))


# Attention as models run it: fused scaled_dot_product_attention over 8 heads of 64 channels, each query row
# attending to at least ATTENTION_MIN_KV keys (a latent frame's 16 tokens over its cached window; a 256-token
# image over itself). On this CPU it runs at 60-90 GFLOP/s in fp32 where a 256-row matmul runs at ~140: the
# softmax's exponentials and the score tiles' traffic cost beside the FLOPs.
ATTENTION_HEADS, ATTENTION_HEAD_DIM, ATTENTION_MIN_KV = 8, 64, 256


def measure_attention(dtype: str, schedule: CpuSchedule) -> Curve:
    """TFLOP/s of scaled_dot_product_attention (FLOPs as residency.workload counts them: 2·L·S·(E + Ev) a head)
    over query rows L, each attending to max(L, ATTENTION_MIN_KV) keys; rows stop growing once one call exceeds
    the schedule's cap."""
    tdtype = TORCH_DTYPES[dtype]
    gen = torch.Generator().manual_seed(2)
    xs, ys, spread = [], [], []
    for rows in schedule.attention_rows:
        keys = max(rows, ATTENTION_MIN_KV)
        q = torch.randn(1, ATTENTION_HEADS, rows, ATTENTION_HEAD_DIM, generator=gen).to(tdtype)
        k, v = (torch.randn(1, ATTENTION_HEADS, keys, ATTENTION_HEAD_DIM, generator=gen).to(tdtype) for _ in range(2))

        def call(q=q, k=k, v=v) -> None:
            torch.nn.functional.scaled_dot_product_attention(q, k, v)

        t0 = time.perf_counter()
        call()  # the first call pays the kernel's setup
        first = time.perf_counter() - t0
        t = time_samples(call, repeats_for(first, schedule.matmul_point_s, lo=3, hi=30))
        xs.append(float(rows))
        ys.append(2.0 * ATTENTION_HEADS * rows * keys * 2 * ATTENTION_HEAD_DIM / t.median_s / 1e12)
        spread.append(round(t.spread, 4))
        if first > schedule.matmul_max_call_s:
            break
    return Curve(tuple(xs), tuple(ys), tuple(spread))


# Convolutions as VAEs run them: 3×3, padding 1, over a CONV_PIXELS-pixel image, from thin (16 → 4 channels: an
# image-out layer) to wide. oneDNN's conv runs far from the matmul rate of a weight its size, both ways: on this
# EPYC (1 thread, fp32) 16 → 3 channels on 64×64 pixels at 12.6 GFLOP/s and 64 → 64 on 16×16 at 63, where the
# matmul model gave ~64 and ~90. The rate is read over the kernel's elements (C_out·C_in·9); the image size is one.
CONV_PIXELS = 32 * 32
CONV_KERNEL = 3


def measure_conv(dtype: str, schedule: CpuSchedule) -> Curve:
    """TFLOP/s of a 3×3 conv2d (FLOPs 2·C_out·C_in·9 a pixel, as residency.workload counts them) over its kernel's
    elements, for the schedule's (in, out) channel pairs in growing kernel size; stops once one call exceeds the
    schedule's cap."""
    tdtype = TORCH_DTYPES[dtype]
    gen = torch.Generator().manual_seed(3)
    side = int(CONV_PIXELS ** 0.5)
    xs, ys, spread = [], [], []
    for c_in, c_out in schedule.conv_channels:
        x = torch.randn(1, c_in, side, side, generator=gen).to(tdtype)
        w = torch.randn(c_out, c_in, CONV_KERNEL, CONV_KERNEL, generator=gen).to(tdtype)

        def call(x=x, w=w) -> None:
            torch.nn.functional.conv2d(x, w, padding=CONV_KERNEL // 2)

        t0 = time.perf_counter()
        call()  # the first call pays the library's setup (oneDNN picks and builds its kernel)
        first = time.perf_counter() - t0
        t = time_samples(call, repeats_for(first, schedule.matmul_point_s, lo=3, hi=30))
        elements = c_out * c_in * CONV_KERNEL * CONV_KERNEL
        xs.append(float(elements))
        ys.append(2.0 * elements * CONV_PIXELS / t.median_s / 1e12)
        spread.append(round(t.spread, 4))
        if first > schedule.matmul_max_call_s:
            break
    return Curve(tuple(xs), tuple(ys), tuple(spread))


# After a matmul the ops that follow run slower: its weight streamed through the caches and evicted the
# interpreter's and the dispatcher's working set, which the next ops fetch back from memory. A matmul sweep and an
# op mix repeated on one tiny tensor (the matmul and per-op figures) both run warm and never see it; a model pays
# it after every weight (measured here: two op mixes after a 1024² fp32 matmul took 120-250 µs more than the same
# two mixes run warm, 10-30 µs more after a 256² one, more under load; a Wan block's 11 matmuls then lose 1.5-2.5
# ms of its ~30).
REWARM_MIXES = 2  # op mixes timed after each matmul: by the second one the loss is mostly paid


def measure_rewarm(schedule: CpuSchedule) -> Curve:
    """µs the non-matmul ops after a 16-row fp32 matmul lose to re-warming the caches, over the weight's elements
    (the schedule's small and large dims, weights cycling through a cache-cold set as measure_matmul's): the time
    of REWARM_MIXES op mixes on a tiny tensor right after the matmul, less the same mixes run again at once;
    medians of `rewarm_repeats` samples, at least 0."""
    gen = torch.Generator().manual_seed(3)
    tiny = torch.randn(*_MIX_TINY_SHAPE, generator=gen)
    xs, ys = [], []
    for dim in (schedule.matmul_small_dim, schedule.matmul_dim):
        weights = [torch.randn(dim, dim, generator=gen) for _ in range(max(2, COLD_WEIGHT_BYTES // (dim * dim * 4)))]
        x, out = torch.randn(16, dim, generator=gen), torch.empty(16, dim)
        cycle = itertools.cycle(weights)

        def mixes() -> float:
            t0 = time.perf_counter()
            for _ in range(REWARM_MIXES):
                op_mix(tiny)
            return time.perf_counter() - t0

        after, warm = [], []
        for _ in range(schedule.rewarm_repeats):
            torch.matmul(x, next(cycle).t(), out=out)
            after.append(mixes())
            warm.append(mixes())
        xs.append(float(dim * dim))
        ys.append(max(0.0, float(np.median(after) - np.median(warm))) * 1e6)
    return Curve(tuple(xs), tuple(ys))


# Activation sizes of the mix: a 16-token frame of 256 channels (4 k elements a tensor) up to 1 M elements, the
# size classes of residency.workload.op_count; the dispatch cost is timed on a 256-element tensor.
_MIX_TOKENS = (16, 64, 256, 1024, 4096)
_MIX_TINY_SHAPE = (1, 4, 64)
_MIX_REPEATS = 9


def _timed_mix(x: torch.Tensor) -> Callable[[], float]:
    rounds = max(3, 250 * 4096 // x.numel())

    def burst() -> float:
        t0 = time.perf_counter()
        for _ in range(rounds):
            op_mix(x)
        return (time.perf_counter() - t0) / rounds

    burst()  # warm-up: first touch of the activations, the allocator's caches
    return burst


def measure_dispatch() -> tuple[float, Curve]:
    """(µs per dispatched op, 1e9 activation elements/s over the size class of an op's largest tensor) of
    the non-matmul op mix. The per-op cost is the mix on a 256-element tensor (its elements cost ~1 %);
    each larger size's remaining time over its elements gives the rate of its class. Ops and elements are
    counted on the meta device by residency.workload.op_count, as a workload's blocks are. Measured here:
    ~2.5 µs per op; ~7 G elements/s while tensors stay in L2, ~2 G from 1 M elements (4 MB) on."""
    inputs = [torch.randn(*_MIX_TINY_SHAPE)] + [torch.randn(1, t, MIX_CHANNELS) for t in _MIX_TOKENS]
    counts = [count_op_mix(tuple(x.shape)) for x in inputs]
    bursts = [_timed_mix(x) for x in inputs]
    # The sizes take turns, so a drift of the machine's speed (10-40 % over a minute on a shared VM) reaches
    # every size alike: measured one size after another, a fit of the two costs swung 2-4 µs per op.
    samples = [[b() for b in bursts] for _ in range(_MIX_REPEATS)]
    seconds = [float(np.median([row[i] for row in samples])) for i in range(len(bursts))]
    per_op_s = seconds[0] / counts[0].ops
    classes, rates = [], []
    for c, t in zip(counts[1:], seconds[1:], strict=True):
        element_s = max(t - c.ops * per_op_s, 0.1 * t)  # a noisy dispatch figure must not zero the rest
        classes.append(float(c.main_size_class))
        rates.append(c.elements / element_s / 1e9)
    return per_op_s * 1e6, Curve(tuple(classes), tuple(rates))
