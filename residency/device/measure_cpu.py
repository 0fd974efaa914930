"""Measure the CPU backend: RAM as device memory, a copy thread as the link, compute on cores − 1.

The copy engine is the runtime's own worker thread (`residency.device.copy_worker`) doing `dst.copy_(src)`
(torch releases the GIL), so the link and the overlap are measured on the thread that will run the loads.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from residency.device.bench_inputs import measured_formats
from residency.device.copy_worker import CopyWorker
from residency.device.host_cpu import cpu_model, usable_cores
from residency.device.host_memory import HostMemory, cpu_reserve_bytes, host_memory
from residency.device.measure_cpu_compute import (
    ATTENTION_HEAD_DIM,
    ATTENTION_HEADS,
    ATTENTION_MIN_KV,
    COLD_WEIGHT_BYTES,
    CONV_KERNEL,
    CONV_PIXELS,
    REWARM_MIXES,
    measure_attention,
    measure_conv,
    measure_dispatch,
    measure_matmul,
    measure_rewarm,
)
from residency.device.measure_cpu_dequant import (
    OUTPUT_RING_BYTES,
    dequant_shapes,
    dequant_store,
    fresh_shape,
    measure_dequant,
)
from residency.device.measurements import (
    DEQUANT_SMALL_SHAPE,
    PROBE_WEIGHTS,
    Measurements,
    ProbeShape,
    block_probe,
    calls_during,
    slowdowns,
    to_profile,
)
from residency.device.profile import COMPUTE_DTYPES, LINK_DIRECTIONS, Curve, DeviceProfile
from residency.device.timing import (
    ProgressFn,
    Steps,
    Timing,
    overlap_fraction,
    repeats_for,
    summarize,
    time_samples,
)
from residency.errors import ResidencyError

KIB, MIB = 2**10, 2**20


@dataclass(frozen=True)
class CpuSchedule:
    """How much to measure: sizes, shapes and a time budget per sample point."""

    link_sizes_bytes: tuple[int, ...]
    link_point_s: float  # time spent per transfer size and direction
    memcpy_bytes: int  # one device-memory copy
    matmul_dim: int
    matmul_small_dim: int  # a second, small weight: few-row rates depend on the matrix's size
    matmul_rows: tuple[int, ...]
    matmul_point_s: float
    matmul_max_call_s: float  # stop growing rows once one call takes longer (CPU fp16 runs ~1 GFLOP/s)
    dequant_shape: tuple[int, int]
    dequant_point_s: float
    overlap_job_s: float  # length of each of the copy and compute jobs
    overlap_repeats: int
    probe_job_s: float  # interference: length of the copy job, and of the block probe's run alone
    probe_repeats: int
    attention_rows: tuple[int, ...] = (16, 256, 1024)  # query rows of the attention curve
    # (in, out) channels of the conv curve's points, growing kernels: an image-out layer, then a VAE's widths
    conv_channels: tuple[tuple[int, int], ...] = ((16, 4), (32, 32), (128, 128))
    rewarm_repeats: int = 40  # matmul-then-op-mix samples per weight size of the re-warm cost


QUICK = CpuSchedule(
    link_sizes_bytes=(64 * KIB, MIB, 16 * MIB, 64 * MIB), link_point_s=0.12, memcpy_bytes=64 * MIB,
    matmul_dim=1024, matmul_small_dim=256, matmul_rows=(1, 16, 256, 4096), matmul_point_s=0.3,
    matmul_max_call_s=0.25, dequant_shape=(2048, 4096), dequant_point_s=0.12, overlap_job_s=0.15,
    overlap_repeats=5, probe_job_s=0.08, probe_repeats=3,
)
FULL = CpuSchedule(
    link_sizes_bytes=(64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB), link_point_s=0.5,
    memcpy_bytes=256 * MIB, matmul_dim=1024, matmul_small_dim=256, matmul_rows=(1, 16, 64, 256, 512, 4096),
    matmul_point_s=1.0, matmul_max_call_s=2.0, dequant_shape=(4096, 4096), dequant_point_s=0.5,
    overlap_job_s=0.4, overlap_repeats=7, probe_job_s=0.3, probe_repeats=5, attention_rows=(16, 64, 256, 1024, 4096),
    rewarm_repeats=100, conv_channels=((16, 4), (16, 16), (32, 32), (64, 64), (128, 128), (256, 256)),
)


def _run_job(job: Callable[[], object], _ticket: int) -> tuple[float, float, float]:
    job()
    t = time.perf_counter()
    return t, t, t  # the worker's timing marks: unused here, the caller times hand-off to completion


def start_copy_engine() -> CopyWorker:
    """The copy engine the measurement times: the runtime's worker thread, running callables."""
    # one intra-op thread, as the runtime's worker (backend_cpu): a copy_ split over threads would write part of a
    # slot from the timing core, whose caches the fresh-input factor must not see filled
    engine = CopyWorker(_run_job, "residency-profile-copy", on_start=lambda: torch.set_num_threads(1))
    engine.start()
    return engine


def timed_copy(engine: CopyWorker, job: Callable[[], object]) -> float:
    """Seconds from hand-off to completion, as a caller of the copy engine sees it; a failed job raises."""
    t0 = time.perf_counter()
    engine.wait(engine.submit(job))
    return time.perf_counter() - t0


def _filled(nbytes: int) -> torch.Tensor:
    # fill_ faults every page in now, so no timed copy pays first-touch page faults.
    return torch.empty(nbytes, dtype=torch.uint8).fill_(1)


def measure_link(engine: CopyWorker, schedule: CpuSchedule) -> dict[str, Curve]:
    """h2d = host store → slot, d2h = slot → host store, each a copy on the engine thread.

    The host side cycles through distinct regions of a store larger than a last-level cache, as the
    runtime's loads do (each block's blob is read once per call): repeating one small copy would run
    from cache, at twice the rate or more (measured: 5.6 ms predicted vs 10.4 ms copied per tiny frame).
    """
    largest = max(schedule.link_sizes_bytes)
    store, slot = _filled(max(largest, COLD_WEIGHT_BYTES)), _filled(largest)
    curves = {}
    for direction in ("h2d", "d2h"):
        gbps, spread = [], []
        for n in schedule.link_sizes_bytes:
            regions = [store[i * n:(i + 1) * n] for i in range(max(1, store.numel() // n))]
            pairs = itertools.cycle([(r, slot[:n]) if direction == "h2d" else (slot[:n], r) for r in regions])

            def copy(pairs=pairs) -> None:
                src, dst = next(pairs)
                dst.copy_(src)

            first = timed_copy(engine, copy)
            reps = repeats_for(first, schedule.link_point_s, lo=5, hi=200)
            t = summarize([timed_copy(engine, copy) for _ in range(reps)])
            gbps.append(n / t.median_s / 1e9)
            spread.append(round(t.spread, 4))
        curves[direction] = Curve(tuple(float(n) for n in schedule.link_sizes_bytes), tuple(gbps), tuple(spread))
    # One host memory: pinned and pageable are the same buffers on the CPU backend.
    return {d: curves[d.split("_")[0]] for d in LINK_DIRECTIONS}


def measure_memcpy_gbps(schedule: CpuSchedule) -> tuple[float, Timing]:
    """GB/s of one device-memory (RAM to RAM) copy on the compute thread, with its timing."""
    src, dst = _filled(schedule.memcpy_bytes), _filled(schedule.memcpy_bytes)
    t = time_samples(lambda: dst.copy_(src), repeats=5)
    return 2 * schedule.memcpy_bytes / t.median_s / 1e9, t  # bytes read plus bytes written


def cold_copy() -> Callable[[], None]:
    """One 16 MiB load per call, from the next region of a DRAM-cold host store into one of two slots."""
    # The copies cycle through a 96 MiB store (3× this CPU's 32 MiB L3; as the link step's) into two alternating
    # slots, as the runtime's loads do: one 16 MiB copy repeated runs partly from cache (18-19 GB/s here against
    # 11-12 cold) and leaves the memory bus to the compute.
    chunk = 16 * MIB
    store, slots = _filled(max(COLD_WEIGHT_BYTES, 4 * chunk)), (_filled(chunk), _filled(chunk))
    regions = [store[i * chunk:(i + 1) * chunk] for i in range(store.numel() // chunk)]
    pairs = itertools.cycle([(r, slots[i % 2]) for i, r in enumerate(regions)])

    def one_copy() -> None:
        src, dst = next(pairs)
        dst.copy_(src)

    return one_copy


def measure_overlap(engine: CopyWorker, schedule: CpuSchedule) -> float:
    """Copy on the engine thread alone, matmuls alone, then both at once; see timing.overlap_fraction.

    The matmuls are the few-row, cache-cold kind a latent frame's blocks run (16 tokens against weights
    read from DRAM): on a CPU the copy and the compute then share the memory bus, and the overlap is
    lower than with a FLOP-bound matmul (measured here: 0.6–0.85 against ~0.96).
    """
    one_copy = cold_copy()
    dim = schedule.matmul_dim
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(dim, dim, generator=gen) for _ in range(max(1, COLD_WEIGHT_BYTES // (dim * dim * 4)))]
    x = torch.randn(16, dim, generator=gen)
    out = torch.empty(16, dim)

    def sweep() -> None:
        for w in weights:
            torch.matmul(x, w.t(), out=out)

    one_copy_s = summarize([timed_copy(engine, one_copy) for _ in range(5)]).median_s
    one_sweep_s = time_samples(sweep, repeats=3).median_s
    copies = max(1, round(schedule.overlap_job_s / one_copy_s))
    sweeps = max(1, round(schedule.overlap_job_s / one_sweep_s))

    def copy_job() -> None:
        for _ in range(copies):
            one_copy()

    def compute_job() -> None:
        for _ in range(sweeps):
            sweep()

    copy_s, compute_s, both_s = [], [], []
    for _ in range(schedule.overlap_repeats):
        copy_s.append(timed_copy(engine, copy_job))
        t0 = time.perf_counter()
        compute_job()
        compute_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ticket = engine.submit(copy_job)
        compute_job()
        engine.wait(ticket)
        both_s.append(time.perf_counter() - t0)
    return overlap_fraction(summarize(copy_s).median_s, summarize(compute_s).median_s, summarize(both_s).median_s)


# The interference probe on the CPU: a 1024-wide block, 16 token rows attending over 2048 cached tokens, its
# weights cycling through 96 MiB (6 sets of 4 × 4 MiB) so that they come from DRAM as a model's do.
_PROBE_DIM = 1024
CPU_PROBE = ProbeShape(dim=_PROBE_DIM, rows=16, kv_tokens=2048, head_dim=64,
                       weight_sets=max(1, COLD_WEIGHT_BYTES // (PROBE_WEIGHTS * _PROBE_DIM * _PROBE_DIM * 4)))
MIN_PROBE_CALLS = 4  # block calls that fit in the copy job at least, so that some run wholly beside it


def _probe_alone(probe: Callable[[], object], duration_s: float) -> list[float]:
    """Seconds of each block call, calls run back to back on this thread for about `duration_s`."""
    times: list[float] = []
    stop = time.perf_counter() + duration_s
    while not times or time.perf_counter() < stop:
        t0 = time.perf_counter()
        probe()
        times.append(time.perf_counter() - t0)
    return times


def _copy_span(engine: CopyWorker, one_copy: Callable[[], None], copies: int,
               probe: Callable[[], object] | None) -> tuple[tuple[float, float], list[tuple[float, float]]]:
    """Run `copies` loads as one job on the copy engine; with `probe`, run block calls on this thread until the
    job ends. Returns the job's (start, end) on the engine and each call's (start, end), perf_counter seconds."""
    span = [0.0, 0.0]
    done = threading.Event()

    def job() -> None:
        span[0] = time.perf_counter()
        try:
            for _ in range(copies):
                one_copy()
        finally:
            span[1] = time.perf_counter()
            done.set()

    ticket = engine.submit(job)
    calls = []
    while probe is not None and not done.is_set():
        t0 = time.perf_counter()
        probe()
        calls.append((t0, time.perf_counter()))
    engine.wait(ticket)
    return (span[0], span[1]), calls


def measure_interference(engine: CopyWorker, schedule: CpuSchedule) -> tuple[float, float]:
    """(copy_slowdown, compute_slowdown) ≥ 1: a copy job on the engine thread alone and beside a loop of
    block-shaped calls (CPU_PROBE) on this thread, and those calls alone and while the copy ran.

    The calls run until the copy job ends, so the copy is timed wholly beside compute; the calls counted are
    those that ran wholly inside the copy. Medians of `probe_repeats` repeats. Costs ~3 × probe_job_s a repeat,
    plus ~0.1 s to fill 96 MiB of weights and 96 MiB of host store."""
    one_copy = cold_copy()
    probe = block_probe(CPU_PROBE, torch.device("cpu"), torch.float32)
    call_s = min(_probe_alone(probe, 0.0) + _probe_alone(probe, 0.0))  # the first pays the allocator's setup
    one_copy_s = min(timed_copy(engine, one_copy) for _ in range(3))
    copies = max(1, round(schedule.probe_job_s / one_copy_s), math.ceil(MIN_PROBE_CALLS * call_s / one_copy_s))
    copy_alone, copy_together, call_alone, call_together = [], [], [], []
    for _ in range(schedule.probe_repeats):
        (start, end), _ = _copy_span(engine, one_copy, copies, None)
        copy_alone.append(end - start)
        call_alone += _probe_alone(probe, end - start)
        window, calls = _copy_span(engine, one_copy, copies, probe)
        copy_together.append(window[1] - window[0])
        call_together += calls_during(calls, window)
    return slowdowns(copy_alone, copy_together, call_alone, call_together)


SMALL_STEP = "matmul, small weights"
ATTENTION_STEP = "attention"
CONV_STEP = "convolution"


def provenance_notes(schedule: CpuSchedule, mem: HostMemory, compute_threads: int) -> dict[str, str]:
    """How each field of a CPU profile was measured (measurements.to_profile puts the command before it)."""
    rows, cols = schedule.dequant_shape
    return {
        "memory": f"RAM via psutil, limited by {mem.limited_by}; usable = available − reserve "
                  "(10 % of total, within 0.5–2 GiB)",
        "link": "copy thread doing dst.copy_(src) from regions of a 96 MiB host store (cache-cold) into one slot, "
                "and back; pinned and pageable are the same host memory on the CPU backend, so each direction "
                "is measured once and recorded for both",
        "device_memory_gbps": f"{schedule.memcpy_bytes} B copy, read + write bytes counted",
        "matmul_tflops": f"x (rows × {schedule.matmul_dim}) @ Wᵀ ({schedule.matmul_dim}², nn.Linear layout, "
                         f"cycling through {COLD_WEIGHT_BYTES // MIB} MiB of weights so they come from DRAM) on "
                         f"{compute_threads} threads; rows stop growing once one call exceeds "
                         f"{schedule.matmul_max_call_s} s",
        "dequant_gweights_per_s": f"unpack of a {rows}×{cols} matrix into fp32 (the CPU backend's compute dtype) "
                                  f"through one reused staging buffer, the packed copies cycling through "
                                  f"{COLD_WEIGHT_BYTES // MIB} MiB so they come from DRAM, the outputs through "
                                  f"{OUTPUT_RING_BYTES // MIB} MiB, less the per-call cost; "
                                  "Q2_K/Q3_K from random valid blocks",
        "dequant_call_us": f"the same unpack of a {DEQUANT_SMALL_SHAPE[0]}×{DEQUANT_SMALL_SHAPE[1]} matrix, less its "
                           "weights at the rate: the time one call costs beyond its weights (torch's per-op dispatch)",
        "dequant_tensor_gweights_per_s": "the same unpack, call included, of "
                                         + ", ".join(f"{r}×{c}" for r, c in dequant_shapes(schedule))
                                         + " matrices: a tensor's time at its size",
        "dequant_fresh_factor": "the same unpack of the {}×{} matrix from a slot the copy thread just copied its "
                                "packed copy into, over the same from DRAM, alternating; ratio of the medians".format(
                                    *fresh_shape(schedule)),
        "copy_compute_overlap": "copy thread alone (16 MiB loads from a DRAM-cold store), a loop of 16-row matmuls "
                                "over DRAM-cold weights alone, both at once",
        "copy_slowdown": f"copy thread's {schedule.probe_job_s} s job of 16 MiB loads from a DRAM-cold store, alone "
                         f"and while {_probe_text(CPU_PROBE)} ran on {compute_threads} threads; median of "
                         f"{schedule.probe_repeats}, clamped to [1, 10]",
        "compute_slowdown": f"{_probe_text(CPU_PROBE)} on {compute_threads} threads, each call alone and wholly "
                            f"during the copy thread's 16 MiB loads; median of the calls of {schedule.probe_repeats} "
                            "runs, clamped to [1, 10]",
        "matmul_small_tflops": f"as matmul_tflops, with {schedule.matmul_small_dim}² weights "
                               f"({COLD_WEIGHT_BYTES // MIB} MiB of them), every compute dtype",
        "launch_overhead_us": "per dispatched op of a norm/elementwise/view/softmax mix on a 256-element tensor",
        "elementwise_gelems_per_s": "activation elements read + written by that mix (counted on the meta device as "
                                    "workloads are) on 4 k to 1 M-element tensors, after its per-op cost",
        "attention_tflops": f"scaled_dot_product_attention, {ATTENTION_HEADS} heads × {ATTENTION_HEAD_DIM}, "
                            f"{schedule.attention_rows} query rows each over max(rows, {ATTENTION_MIN_KV}) keys, every "
                            f"compute dtype, on {compute_threads} threads; FLOPs 2·L·S·(E + Ev) a head",
        "conv_tflops": f"conv2d {CONV_KERNEL}×{CONV_KERNEL}, padding 1, on a {CONV_PIXELS}-pixel image, (in, out) "
                       f"channels {schedule.conv_channels}, every compute dtype, on {compute_threads} threads; "
                       "FLOPs 2·C_out·C_in·k² a pixel, over the kernel's elements",
        "matmul_rewarm_us": f"{REWARM_MIXES} op mixes on a 256-element tensor right after a 16-row fp32 matmul over a "
                            f"{schedule.matmul_small_dim}² or {schedule.matmul_dim}² weight (cycling through "
                            f"{COLD_WEIGHT_BYTES // MIB} MiB), less the same mixes run again at once; median of "
                            f"{schedule.rewarm_repeats}",
    }


def _probe_text(shape: ProbeShape) -> str:
    return (f"block-shaped fp32 calls ({shape.rows}-row matmuls against {PROBE_WEIGHTS} {shape.dim}² weights "
            f"cycling through {shape.weight_sets} sets, attention over {shape.kv_tokens} cached tokens, layer norms, "
            "GELU, residual adds)")


def usable_memory(mem: HostMemory) -> tuple[int, int]:
    """(reserve, usable) bytes of RAM; ResidencyError when the reserve leaves nothing."""
    reserve = cpu_reserve_bytes(mem.total_bytes)
    usable = mem.available_bytes - reserve
    if usable <= 0:
        raise ResidencyError(f"only {mem.available_bytes} bytes of RAM are available, less than the "
                             f"{reserve}-byte reserve", hint="close other programs and measure again")
    return reserve, usable


def measure_all(engine: CopyWorker, schedule: CpuSchedule, formats: list[str], step: Steps,
                compute_threads: int) -> tuple[Measurements, HostMemory]:
    """Every field, in the order the progress steps announce them; the RAM reading its provenance cites."""
    step("memory")
    mem = host_memory()
    reserve, usable = usable_memory(mem)
    step("link")
    link = measure_link(engine, schedule)
    step("device memory")
    memcpy_gbps, _ = measure_memcpy_gbps(schedule)
    matmul = {}
    for d in COMPUTE_DTYPES:
        step(f"matmul {d}")
        matmul[d] = measure_matmul(d, schedule)
    # The small-weight curve for every dtype: a narrow dtype's large-weight rate says little about small weights
    # (this EPYC: bf16 at 16 rows 108 GFLOP/s on 1024² weights, where a 256²-wide DiT block ran no faster in bf16
    # than in fp32). A dtype that crawls costs ~0.3 s a point (matmul_point_s), no more.
    step(SMALL_STEP)
    small = {d: measure_matmul(d, schedule, schedule.matmul_small_dim) for d in COMPUTE_DTYPES}
    step(ATTENTION_STEP)
    attention = {d: measure_attention(d, schedule) for d in COMPUTE_DTYPES}
    step(CONV_STEP)
    conv = {d: measure_conv(d, schedule) for d in COMPUTE_DTYPES}
    dequant, dequant_call, dequant_tensor, dequant_fresh = {}, {}, {}, {}
    store = dequant_store(schedule)
    for f in formats:
        step(f"dequant {f}")
        dequant[f], dequant_call[f], dequant_tensor[f], dequant_fresh[f] = measure_dequant(f, schedule, engine, store)
    del store
    step("overlap")
    overlap = measure_overlap(engine, schedule)
    copy_slowdown, compute_slowdown = measure_interference(engine, schedule)
    step("launch overhead")
    launch_us, elementwise = measure_dispatch()
    rewarm = measure_rewarm(schedule)
    found = Measurements(
        name=f"{cpu_model()} ({usable_cores()} cores)", vendor="cpu", backend="cpu", driver="",
        memory_total_bytes=mem.total_bytes, memory_reserve_bytes=reserve, memory_usable_bytes=usable,
        link=link, device_memory_gbps=memcpy_gbps, matmul_tflops=matmul, matmul_weight_dim=schedule.matmul_dim,
        matmul_small_tflops=small, matmul_small_weight_dim=schedule.matmul_small_dim,
        dequant_gweights_per_s=dequant, dequant_call_us=dequant_call,
        dequant_tensor_gweights_per_s=dequant_tensor, dequant_fresh_factor=dequant_fresh, copy_compute_overlap=overlap, copy_slowdown=copy_slowdown,
        compute_slowdown=compute_slowdown, launch_overhead_us=launch_us,
        elementwise_gelems_per_s=elementwise, compute_threads=compute_threads, attention_tflops=attention,
        conv_tflops=conv, matmul_rewarm_us=rewarm,
    )
    return found, mem


def measure(quick: bool, progress: ProgressFn | None = None, source: str | None = None) -> DeviceProfile:
    """This machine's CPU backend measured (`quick`: the QUICK schedule, well under a minute) into a profile;
    `source` is the command recorded in every provenance. ResidencyError when RAM is all but used up."""
    schedule = QUICK if quick else FULL
    source = source or f"residency profile --device cpu{' --quick' if quick else ''}"
    formats = measured_formats()
    step = Steps(formats, COMPUTE_DTYPES, progress, matmul_extra=(SMALL_STEP, ATTENTION_STEP, CONV_STEP))
    compute_threads = max(1, usable_cores() - 1)
    previous_threads = torch.get_num_threads()
    # Compute keeps cores − 1 threads; the copy thread's copy_ then runs inline on its own core.
    torch.set_num_threads(compute_threads)
    engine = start_copy_engine()
    try:
        found, mem = measure_all(engine, schedule, formats, step, compute_threads)
    finally:
        engine.stop()
        torch.set_num_threads(previous_threads)
    step.finish()
    return to_profile(found, source, provenance_notes(schedule, mem, compute_threads))
