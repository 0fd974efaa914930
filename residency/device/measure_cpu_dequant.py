"""The CPU's unpack probes: each storage format's rate and per-call cost, its rate over tensor size (the packed
input from DRAM, as a block's comes) and the factor an input just copied into a slot (a streamed block's) runs at.
Part of the CPU measurement (residency.device.measure_cpu)."""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from residency.device.bench_inputs import packed_sample
from residency.device.copy_worker import CopyWorker
from residency.device.measure_cpu_compute import COLD_WEIGHT_BYTES
from residency.device.measurements import DEQUANT_SMALL_SHAPE, dequant_rate_and_call
from residency.device.profile import Curve
from residency.device.timing import repeats_for, time_samples
from residency.formats import get_format
from residency.formats.staging import StagedUnpack, new_staging, staging_bytes

if TYPE_CHECKING:
    from residency.device.measure_cpu import CpuSchedule

# A model's weights come from DRAM on every call: the matmuls cycle through distinct weights totalling more
# than a CPU's last-level cache, or the few-row rates (weight-bandwidth bound) would read from cache.
# The CPU backend computes in fp32 (bf16 matmuls are slow on most CPUs), so a block's weights are unpacked
# into fp32: a GGUF kernel writes that output in place, while bf16 would add a cast pass over a temporary.
DEQUANT_OUT_DTYPE = torch.float32


# Below the schedule's matrix, the per-tensor curve's shapes: a call-bound one (DEQUANT_SMALL_SHAPE), then tensor
# sizes a small model's blocks hold (64K-1M weights), whose output still fits the caches while 8M does not.
DEQUANT_TENSOR_SHAPES = (DEQUANT_SMALL_SHAPE, (64, 1024), (256, 1024), (1024, 1024))


def dequant_shapes(schedule: CpuSchedule) -> tuple[tuple[int, int], ...]:
    """The per-tensor curve's shapes below the schedule's matrix, then that matrix: sizes strictly growing."""
    large = math.prod(schedule.dequant_shape)
    return (*(s for s in DEQUANT_TENSOR_SHAPES if math.prod(s) < large), schedule.dequant_shape)


def fresh_shape(schedule: CpuSchedule) -> tuple[int, int]:
    """The shape the fresh-input factor is timed at: the curve's middle size, as the profile table shows it."""
    shapes = dequant_shapes(schedule)
    return shapes[len(shapes) // 2]


# The outputs a probe unpacks into rotate through this many bytes (at least one output): the runtime unpacks a block
# into a scratch (or a slot) the block before it wrote, which a core's L2 no longer holds. Into one reused output,
# warm in L2, Q8_0 at 256 K weights timed 1.25× faster than into outputs rotating through 8 MiB (BF16 1.4×, Q4_K
# 1.04×; this EPYC, 2 MiB L2 a core, 32 MiB L3), and the shipped model's streamed Q8_0 blocks unpacked 1.45× slower
# in the runtime than the curve of one reused output predicted.
OUTPUT_RING_BYTES = 8 * 2**20


def output_ring(rows: int, cols: int) -> Iterator[torch.Tensor]:
    """Endless (rows, cols) fp32 outputs cycling through OUTPUT_RING_BYTES (one output when larger), each page
    touched once here, not in a timed call."""
    count = max(1, OUTPUT_RING_BYTES // (rows * cols * DEQUANT_OUT_DTYPE.itemsize))
    ring = torch.zeros(count, rows, cols, dtype=DEQUANT_OUT_DTYPE)
    return itertools.cycle(list(ring.unbind(0)))


def dequant_store(schedule: CpuSchedule) -> torch.Tensor:
    """The byte store measure_dequant's packed copies tile: COLD_WEIGHT_BYTES plus the largest packed matrix (at
    most 4 bytes a weight, F32), faulted in once here for every format rather than once per format and size."""
    return torch.zeros(COLD_WEIGHT_BYTES + 4 * math.prod(schedule.dequant_shape), dtype=torch.uint8)


def measure_dequant(name: str, schedule: CpuSchedule, engine: CopyWorker, store: torch.Tensor | None = None
                    ) -> tuple[float, float, Curve, float]:
    """(1e9 weights/s, µs per unpack call, the per-tensor curve, the fresh-input factor) unpacking into preallocated
    fp32 buffers (output_ring's: the caches no longer hold them) through one staging buffer, as the runtime's threads
    do, at DEQUANT_TENSOR_SHAPES and the schedule's matrix. Rate and
    call cost come from the largest and smallest (measurements.dequant_rate_and_call); the curve holds every size.

    The packed input comes from DRAM, as a streamed or resident block's does: the copies of one packed matrix tile
    `store` (dequant_store's, made here when None), written in order, and the samples unpack them oldest first
    (repeating one tensor timed Q8_0 at 256K weights 1.3× faster than the runtime unpacks it). The large matrix
    gets the point's time, each smaller one a fifth, at least 15 samples: a small call is ~0.02-0.1 ms and noisy.
    At the middle size the same unpack from a slot its input was just copied into (a streamed block's) is timed
    against one from DRAM, alternately: the factor is the ratio of their medians (fresh_input_factor). `engine` (the
    measurement's copy worker, measure_cpu.start_copy_engine) makes those copies, as the runtime's copy worker does."""
    fmt = get_format(name)
    shapes = dequant_shapes(schedule)
    store = dequant_store(schedule) if store is None else store
    staging = new_staging(staging_bytes("cpu", math.prod(shapes[-1]), DEQUANT_OUT_DTYPE), "cpu")
    # the runtime's call: its own blobs into its own outputs, unchecked (fmt.unpack's argument checks added ~3.6 µs a
    # call, a quarter of a small tensor's whole unpack here)
    unpack = StagedUnpack(fmt, staging).unpack
    weights, seconds, spread = [], [], []
    for rows, cols in shapes:
        large = (rows, cols) == shapes[-1]
        budget_s, least, most = (schedule.dequant_point_s, 3, 30) if large else (schedule.dequant_point_s / 5, 15, 400)
        packed = packed_sample(fmt, rows, cols).view(torch.uint8).reshape(-1)
        tiled = store[: store.numel() // packed.numel() * packed.numel()].view(-1, packed.numel())
        tiled.copy_(packed.expand_as(tiled))
        # views of the copies written first (the coldest), one per sample: indexing in the timed call costs ~1 µs
        copies = itertools.cycle([tiled[i] for i in range(min(tiled.shape[0], most + 1))])
        outs = output_ring(rows, cols)
        t0 = time.perf_counter()
        unpack(next(copies), next(outs))
        repeats = repeats_for(time.perf_counter() - t0, budget_s, least, most)
        t = time_samples(lambda c=copies, o=outs: unpack(next(c), next(o)), repeats, warmup=0)
        weights.append(rows * cols)
        seconds.append(t.median_s)
        spread.append(round(t.spread, 4))
        if (rows, cols) == fresh_shape(schedule):
            fresh = fresh_input_factor(lambda src, o=outs: unpack(src, next(o)), copies, packed, repeats,
                                       engine)
    rate, call_us = dequant_rate_and_call(weights[-1], seconds[-1], weights[0], seconds[0])
    curve = Curve(tuple(float(n) for n in weights), tuple(n / s / 1e9 for n, s in zip(weights, seconds, strict=True)),
                  tuple(spread))
    return rate, call_us, curve, fresh


MIN_FRESH_FACTOR = 0.2  # an input in the cache unpacking 5× faster than from DRAM would be a broken measurement


def fresh_input_factor(unpack: Callable[[torch.Tensor], object], copies: Iterator[torch.Tensor],
                       packed: torch.Tensor, repeats: int, engine: CopyWorker) -> float:
    """Median time of `unpack` from a slot the next packed copy was just copied into, over its median from the next
    copy in DRAM, the two alternating (the machine's drift falls on both); in [MIN_FRESH_FACTOR, 1]. The copy into
    the slot is made by `engine`, on the other core, and not timed: as the runtime's copy worker makes it (copied by
    the timing thread itself, the input sat in its own L2: Q8_0 0.92 against 0.99 from the worker's copy, BF16 0.77
    against 0.81, on this EPYC)."""
    slot = torch.empty_like(packed)
    cold, fresh = [], []
    for _ in range(max(repeats, 15)):
        src = next(copies)
        t0 = time.perf_counter()
        unpack(src)
        cold.append(time.perf_counter() - t0)
        nxt = next(copies)
        engine.wait(engine.submit(lambda s=nxt: slot.copy_(s)))
        t0 = time.perf_counter()
        unpack(slot)
        fresh.append(time.perf_counter() - t0)
    return min(1.0, max(MIN_FRESH_FACTOR, statistics.median(fresh) / statistics.median(cold)))
