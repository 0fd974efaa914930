"""Measure a CUDA or ROCm GPU through torch.cuda: link curves, memory, matmul, dequant, overlap, launches.

Copies run on a side stream from pinned (or pageable) host buffers and are timed with CUDA events.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from dataclasses import dataclass

import torch

from residency.device.bench_inputs import MIX_CHANNELS, count_op_mix, measured_formats, op_mix, packed_sample
from residency.device.measurements import (
    DEQUANT_SMALL_SHAPE,
    PROBE_WEIGHTS,
    Measurements,
    ProbeShape,
    block_probe,
    calls_during,
    dequant_rate_and_call,
    slowdowns,
    to_profile,
)
from residency.device.profile import COMPUTE_DTYPES, Curve, DeviceProfile
from residency.device.timing import ProgressFn, Steps, Timing, overlap_fraction, summarize
from residency.formats import TORCH_DTYPES, get_format
from residency.formats.staging import StagedUnpack, new_staging, staging_bytes

KIB, MIB = 2**10, 2**20
# Kept free beyond what the driver reports in use: allocator fragmentation and cuBLAS/hipBLAS workspaces.
GPU_RESERVE_BYTES = 512 * MIB


@dataclass(frozen=True)
class GpuSchedule:
    """How much to measure: sizes, shapes and repeats per sample point (device time, CUDA events)."""

    link_sizes_bytes: tuple[int, ...]
    link_repeats: int  # per transfer size, direction and host memory kind
    memcpy_bytes: int  # one device-to-device copy
    matmul_dim: int
    matmul_small_dim: int  # a second, small weight: small matrices leave much of a GPU idle
    matmul_rows: tuple[int, ...]
    matmul_repeats: int  # also the elementwise mix's, per size
    dequant_shape: tuple[int, int]
    dequant_repeats: int
    overlap_copy_bytes: int  # the h2d copy the overlap is measured with
    overlap_repeats: int


QUICK = GpuSchedule(
    link_sizes_bytes=(64 * KIB, MIB, 16 * MIB, 64 * MIB), link_repeats=5, memcpy_bytes=128 * MIB,
    matmul_dim=2048, matmul_small_dim=256, matmul_rows=(16, 256, 4096), matmul_repeats=5,
    dequant_shape=(1024, 4096), dequant_repeats=5, overlap_copy_bytes=64 * MIB, overlap_repeats=3,
)
FULL = GpuSchedule(
    link_sizes_bytes=(64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB), link_repeats=15,
    memcpy_bytes=512 * MIB, matmul_dim=4096, matmul_small_dim=256, matmul_rows=(16, 64, 256, 512, 4096),
    matmul_repeats=15, dequant_shape=(4096, 4096), dequant_repeats=15, overlap_copy_bytes=256 * MIB,
    overlap_repeats=7,
)


SMALL_STEP = "matmul, small weights"
GPU_SMALL_DTYPES = ("bf16", "fp16")  # what GPUs compute in


def time_events(fn, repeats: int, stream: torch.cuda.Stream, warmup: int = 1, cover=None) -> Timing:
    """Seconds per call of `fn` enqueued on `stream`, between two CUDA events (device time, not host).

    `cover` (a long kernel) is queued before each start event when given: the host has then launched all of
    `fn` before the device reaches it, so a mix of 10 µs kernels runs back to back instead of at the host's
    launch rate."""
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    stream.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            if cover is not None:
                cover()
            start.record(stream)
            fn()
            end.record(stream)
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3)
    return summarize(samples)


def device_memory(dev: torch.device) -> tuple[int, int]:
    """(total, free) bytes; some ROCm set-ups raise from mem_get_info, then total − reserved is used."""
    props = torch.cuda.get_device_properties(dev)
    try:
        free, total = torch.cuda.mem_get_info(dev)
        return int(total), int(free)
    except RuntimeError:
        total = int(props.total_memory)
        return total, total - int(torch.cuda.memory_reserved(dev))


def driver_version() -> str:
    """The driver version from nvidia-smi or rocm-smi when installed; "" otherwise."""
    for cmd in (["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                ["rocm-smi", "--showdriverversion"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in out.splitlines():
            text = line.split(":", 1)[-1].strip()
            if text and text[0].isdigit():
                return text
    return ""


def measure_link(dev: torch.device, side: torch.cuda.Stream, schedule: GpuSchedule) -> dict[str, Curve]:
    """GB/s over transfer size in each direction, from pinned and from pageable host memory."""
    largest = max(schedule.link_sizes_bytes)
    device_buf = torch.empty(largest, dtype=torch.uint8, device=dev)
    curves = {}
    for pinned in (True, False):
        host = torch.empty(largest, dtype=torch.uint8, pin_memory=pinned).fill_(1)
        for direction in ("h2d", "d2h"):
            gbps, spread = [], []
            for n in schedule.link_sizes_bytes:
                src, dst = (host[:n], device_buf[:n]) if direction == "h2d" else (device_buf[:n], host[:n])
                t = time_events(lambda s=src, d=dst: d.copy_(s, non_blocking=True), schedule.link_repeats, side)
                gbps.append(n / t.median_s / 1e9)
                spread.append(round(t.spread, 4))
            key = f"{direction}_{'pinned' if pinned else 'pageable'}"
            curves[key] = Curve(tuple(float(n) for n in schedule.link_sizes_bytes), tuple(gbps), tuple(spread))
        del host
    return curves


def measure_memcpy_gbps(dev: torch.device, stream: torch.cuda.Stream, schedule: GpuSchedule) -> float:
    """GB/s of one device-to-device copy, read plus written bytes."""
    src = torch.ones(schedule.memcpy_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = time_events(lambda: dst.copy_(src), 10, stream)
    return 2 * schedule.memcpy_bytes / t.median_s / 1e9  # bytes read plus bytes written


def measure_matmul(dev: torch.device, stream: torch.cuda.Stream, dtype: str, schedule: GpuSchedule,
                   dim: int | None = None) -> Curve:
    """TFLOP/s of x (rows × dim) @ W (dim × dim; dim defaults to the schedule's) over the schedule's rows."""
    dim, tdtype = dim or schedule.matmul_dim, TORCH_DTYPES[dtype]
    w = torch.randn(dim, dim, device=dev, dtype=tdtype)
    xs, ys, spread = [], [], []
    for rows in schedule.matmul_rows:
        x = torch.randn(rows, dim, device=dev, dtype=tdtype)
        out = torch.empty(rows, dim, device=dev, dtype=tdtype)
        t = time_events(lambda x=x, out=out: torch.matmul(x, w, out=out), schedule.matmul_repeats, stream, warmup=3)
        xs.append(float(rows))
        ys.append(2.0 * rows * dim * dim / t.median_s / 1e12)
        spread.append(round(t.spread, 4))
    return Curve(tuple(xs), tuple(ys), tuple(spread))


def measure_dequant(dev: torch.device, stream: torch.cuda.Stream, name: str,
                    schedule: GpuSchedule) -> tuple[float, float]:
    """(1e9 weights/s, µs per unpack call) of `name` unpacked into bf16 on the device (packed on the host)
    through one staging buffer, as the runtime's streams do: the schedule's matrix and a DEQUANT_SMALL_SHAPE one,
    whose events span its kernels and the launch gaps between them (measurements.dequant_rate_and_call)."""
    fmt = get_format(name)
    shapes = (schedule.dequant_shape, DEQUANT_SMALL_SHAPE)
    staging = new_staging(staging_bytes("cuda", math.prod(shapes[0]), torch.bfloat16), dev)
    unpack = StagedUnpack(fmt, staging).unpack  # the runtime's unchecked call: the checks' host time is not its
    timed = []
    for (rows, cols), repeats in zip(shapes, (schedule.dequant_repeats, 4 * schedule.dequant_repeats), strict=True):
        packed = packed_sample(fmt, rows, cols).to(dev)  # packed on the host, unpacked on the device
        out = torch.empty(rows, cols, dtype=torch.bfloat16, device=dev)
        t = time_events(lambda p=packed, o=out: unpack(p, o), repeats, stream, warmup=2)
        timed += [rows * cols, t.median_s]
    return dequant_rate_and_call(*timed)


def measure_dequant_rates(dev: torch.device, stream: torch.cuda.Stream, formats: list[str], schedule: GpuSchedule,
                          step) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """(rate per format, µs per call per format, why not measured per format). A format whose pack or unpack needs a package this
    machine lacks (NF4 without bitsandbytes) is left out with the reason: the rest of the profile stands,
    and planning with that format then asks for a profile that has it."""
    rates, calls, missing = {}, {}, {}
    for f in formats:
        step(f"dequant {f}")
        try:
            rates[f], calls[f] = measure_dequant(dev, stream, f, schedule)
        except ModuleNotFoundError as e:
            missing[f] = f"needs the {e.name or 'missing'} package, not installed here"
    return rates, calls, missing


def measure_overlap(dev: torch.device, side: torch.cuda.Stream, schedule: GpuSchedule) -> float:
    """Side-stream h2d copy alone, a matmul loop alone, then both at once (host clock, synchronized)."""
    host = torch.empty(schedule.overlap_copy_bytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    dst = torch.empty(schedule.overlap_copy_bytes, dtype=torch.uint8, device=dev)
    dim = schedule.matmul_dim
    x = torch.randn(4096, dim, device=dev, dtype=torch.bfloat16)
    w = torch.randn(dim, dim, device=dev, dtype=torch.bfloat16)
    out = torch.empty(4096, dim, device=dev, dtype=torch.bfloat16)
    compute = torch.cuda.current_stream(dev)

    def copy() -> None:
        with torch.cuda.stream(side):
            dst.copy_(host, non_blocking=True)

    def wall(fn) -> float:
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    # Untimed first calls: the first copy from a fresh pinned buffer and the first matmul of a shape pay
    # one-time costs (page mapping, cuBLAS heuristics) that would skew the matmul count below.
    wall(copy)
    wall(lambda: torch.matmul(x, w, out=out))
    copy_s = wall(copy)
    one_matmul_s = wall(lambda: torch.matmul(x, w, out=out))
    matmuls = max(1, round(copy_s / max(one_matmul_s, 1e-6)))  # compute about as long as the copy

    def compute_loop() -> None:
        with torch.cuda.stream(compute):
            for _ in range(matmuls):
                torch.matmul(x, w, out=out)

    def both() -> None:
        copy()
        compute_loop()

    samples = [(wall(copy), wall(compute_loop), wall(both)) for _ in range(schedule.overlap_repeats)]
    med = [summarize([s[i] for s in samples]).median_s for i in range(3)]
    return overlap_fraction(*med)


# The interference probe on a GPU: 64 token rows of a matmul_dim-wide block (bf16, 128-wide heads) attending
# over 4096 cached tokens, its weights cycling through 256 MiB so that they come from device memory, not L2.
PROBE_ROWS, PROBE_KV_TOKENS, PROBE_HEAD_DIM, PROBE_COLD_BYTES = 64, 4096, 128, 256 * MIB
PROBE_LEAD = 3  # the probe's run lasts this many times the copy alone, so the copy runs wholly beside it
PROBE_MAX_CALLS = 2000  # bounds the host's enqueueing (~12 kernels a call)
COPY_CHUNK_BYTES = 16 * MIB  # the copy job moves its bytes as loads of this size, as a streamed block's


def probe_shape(schedule: GpuSchedule) -> ProbeShape:
    """The GPU probe at the schedule's matmul width."""
    dim = schedule.matmul_dim
    return ProbeShape(dim=dim, rows=PROBE_ROWS, kv_tokens=PROBE_KV_TOKENS, head_dim=min(PROBE_HEAD_DIM, dim),
                      weight_sets=max(1, PROBE_COLD_BYTES // (PROBE_WEIGHTS * dim * dim * 2)))


class _ProbeRun:
    """Block-shaped calls on the compute stream, each ended by a CUDA event; optionally a side-stream copy job
    that starts when the first call does. A queue of large matmuls runs first (the cover), long enough that the
    host has enqueued every call before the device reaches them: calls then run back to back at device speed."""

    def __init__(self, dev: torch.device, side: torch.cuda.Stream, copy_job, probe):
        # compute is the current (default) stream, where _device_s and _host_enqueue_s enqueue too
        self.dev, self.side, self.copy_job, self.probe = dev, side, copy_job, probe
        self.compute = torch.cuda.current_stream(dev)
        self.cover_a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
        self.cover_out = torch.empty_like(self.cover_a)
        self.cover_s = self._device_s(self._cover, 1)
        self.enqueue_s = 0.0  # one cover until measured
        self.enqueue_s = self._host_enqueue_s()

    def _cover(self) -> None:
        torch.matmul(self.cover_a, self.cover_a, out=self.cover_out)

    def _device_s(self, fn, repeats: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()  # warm-up: the first call of a shape picks its kernels
        start.record(self.compute)
        for _ in range(repeats):
            fn()
        end.record(self.compute)
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / repeats

    def _host_enqueue_s(self) -> float:
        """Host seconds to enqueue one call and its event."""
        self.run(8, with_copy=False)  # warm-up, and the allocator's blocks for the calls
        torch.cuda.synchronize(self.dev)
        t0 = time.perf_counter()
        for _ in range(8):
            self.probe()
            torch.cuda.Event(enable_timing=True).record(self.compute)
        seconds = (time.perf_counter() - t0) / 8
        torch.cuda.synchronize(self.dev)
        return seconds

    def run(self, calls: int, with_copy: bool) -> tuple[float, list[tuple[float, float]], tuple[float, float]]:
        """(copy seconds, each call's (start, end), the copy's (start, end)), times in seconds from the first
        call's start; the copy's are 0 without a copy."""
        # twice the host's enqueueing time: a slower host moment must not starve the device
        covers = 1 + math.ceil(2.0 * calls * self.enqueue_s / max(self.cover_s, 1e-6))
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(calls + 1)]
        copy_marks = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        with torch.cuda.stream(self.compute):
            for _ in range(covers):
                self._cover()
            marks[0].record(self.compute)
            if with_copy:
                self.side.wait_event(marks[0])  # the copy starts when the calls do
                with torch.cuda.stream(self.side):
                    copy_marks[0].record(self.side)
                    self.copy_job()
                    copy_marks[1].record(self.side)
            for i in range(calls):
                self.probe()
                marks[i + 1].record(self.compute)
        torch.cuda.synchronize(self.dev)
        ends = [marks[0].elapsed_time(m) * 1e-3 for m in marks]
        window = (marks[0].elapsed_time(copy_marks[0]) * 1e-3, marks[0].elapsed_time(copy_marks[1]) * 1e-3) \
            if with_copy else (0.0, 0.0)
        return window[1] - window[0], list(zip(ends[:-1], ends[1:], strict=True)), window


def measure_interference(dev: torch.device, side: torch.cuda.Stream, schedule: GpuSchedule) -> tuple[float, float]:
    """(copy_slowdown, compute_slowdown) ≥ 1: an h2d copy job (overlap_copy_bytes from pinned memory, in 16 MiB
    loads) on the side stream alone and beside block-shaped calls (probe_shape) on the compute stream, and those
    calls alone and while the copy ran; CUDA events, medians of overlap_repeats runs.

    The calls last PROBE_LEAD × the copy alone, so the copy runs wholly beside compute; the calls counted are
    those that ran wholly inside the copy."""
    chunk = min(COPY_CHUNK_BYTES, schedule.overlap_copy_bytes)
    loads = max(1, schedule.overlap_copy_bytes // chunk)
    host = torch.empty(loads * chunk, dtype=torch.uint8, pin_memory=True).fill_(1)
    slots = torch.empty(2, chunk, dtype=torch.uint8, device=dev)

    def copy_job() -> None:  # enqueued on the current (side) stream by the caller
        for i in range(loads):
            slots[i % 2].copy_(host[i * chunk:(i + 1) * chunk], non_blocking=True)

    probe = block_probe(probe_shape(schedule), dev, torch.bfloat16)
    runs = _ProbeRun(dev, side, copy_job, probe)
    copy_alone = [time_events(copy_job, schedule.overlap_repeats, side).median_s]
    _, first, _ = runs.run(8, with_copy=False)
    call_s = sorted(e - s for s, e in first)[len(first) // 2]
    calls = min(PROBE_MAX_CALLS, max(8, math.ceil(PROBE_LEAD * copy_alone[0] / max(call_s, 1e-7))))
    copy_together, call_alone, call_together = [], [], []
    for _ in range(schedule.overlap_repeats):
        call_alone += [e - s for s, e in runs.run(calls, with_copy=False)[1]]
        copy_s, timeline, window = runs.run(calls, with_copy=True)
        copy_together.append(copy_s)
        call_together += calls_during(timeline, window)
    return slowdowns(copy_alone, copy_together, call_alone, call_together)


# Activation sizes of the mix: 4 k to 16 M elements a tensor (a 16-token frame up to Flux's 4096 × 3072), the
# size classes of residency.workload.op_count.
_MIX_TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536)


def measure_elementwise(dev: torch.device, stream: torch.cuda.Stream, schedule: GpuSchedule) -> Curve:
    """1e9 activation elements/s of the non-matmul op mix in bf16 over the size class of its tensors:
    device time (the host's launch time is the launch-overhead figure's, and the cost model takes the larger
    of the two), elements counted on the meta device as a workload's blocks are. Small tensors run at
    kernel latency, not at the memory bandwidth: that is the point of measuring them."""
    side = schedule.matmul_dim
    a = torch.randn(side, side, device=dev, dtype=torch.bfloat16)
    cover_out = torch.empty_like(a)

    def cover() -> None:  # ~2·side³ FLOPs: milliseconds on any GPU, longer than launching the mix
        torch.matmul(a, a, out=cover_out)

    classes, rates = [], []
    for tokens in _MIX_TOKENS:
        x = torch.randn(1, tokens, MIX_CHANNELS, device=dev, dtype=torch.bfloat16)
        counter = count_op_mix(tuple(x.shape), torch.bfloat16)
        t = time_events(lambda x=x: op_mix(x), schedule.matmul_repeats, stream, cover=cover)
        classes.append(float(counter.main_size_class))
        rates.append(counter.elements / t.median_s / 1e9)
        del x
    return Curve(tuple(classes), tuple(rates))


def measure_launch_us(dev: torch.device) -> float:
    """Host-side cost per tiny kernel: 1000 in-place adds on one element, then one synchronize."""
    a = torch.zeros(1, device=dev)
    launches = 1000
    samples = []
    for _ in range(7):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(launches):
            a.add_(1.0)
        torch.cuda.synchronize(dev)
        samples.append((time.perf_counter() - t0) / launches)
    return summarize(samples).median_s * 1e6


def provenance_notes(schedule: GpuSchedule, not_measured: dict[str, str]) -> dict[str, str]:
    """How each field of a GPU profile was measured (measurements.to_profile puts the command before it)."""
    rows, cols = schedule.dequant_shape
    return {
        "memory": f"torch.cuda.mem_get_info; usable = free − {GPU_RESERVE_BYTES} B reserve",
        "link": "non_blocking copies on a side stream, CUDA events",
        "device_memory_gbps": f"{schedule.memcpy_bytes} B device-to-device copy, read + write bytes counted",
        "matmul_tflops": f"x (rows × {schedule.matmul_dim}) @ W ({schedule.matmul_dim}²), CUDA events",
        "dequant_gweights_per_s": f"unpack of a {rows}×{cols} matrix into bf16 on the device"
                                  + "".join(f"; {f} not measured: {why}" for f, why in not_measured.items()),
        "dequant_call_us": f"the same unpack of a {DEQUANT_SMALL_SHAPE[0]}×{DEQUANT_SMALL_SHAPE[1]} matrix, CUDA events, "
                           "less its weights at the rate: one call's launches beyond its weights",
        "copy_compute_overlap": "side-stream h2d copy alone, bf16 matmul loop alone, both at once",
        "copy_slowdown": f"side-stream h2d copy of {schedule.overlap_copy_bytes} B from pinned memory in 16 MiB loads, "
                         f"alone and while {_probe_text(schedule)} ran on the compute stream; CUDA events, median "
                         f"of {schedule.overlap_repeats}, clamped to [1, 10]",
        "compute_slowdown": f"{_probe_text(schedule)}, each call alone and wholly during that side-stream copy; CUDA "
                            f"events, median of the calls of {schedule.overlap_repeats} runs, clamped to [1, 10]",
        "launch_overhead_us": "1000 in-place adds on a 1-element tensor",
        "matmul_small_tflops": f"as matmul_tflops, with {schedule.matmul_small_dim}² weights, "
                               f"{' and '.join(GPU_SMALL_DTYPES)}",
        "elementwise_gelems_per_s": "a norm/elementwise/softmax mix in bf16 on 4 k to 16 M-element tensors, "
                                    "CUDA events; elements counted on the meta device",
    }


def _probe_text(schedule: GpuSchedule) -> str:
    shape = probe_shape(schedule)
    return (f"block-shaped bf16 calls ({shape.rows}-row matmuls against {PROBE_WEIGHTS} {shape.dim}² weights cycling "
            f"through {shape.weight_sets} sets, scaled_dot_product_attention over {shape.kv_tokens} cached tokens, "
            "layer norms, GELU, residual adds)")


def measure_all(dev: torch.device, schedule: GpuSchedule, formats: list[str],
                step: Steps) -> tuple[Measurements, dict[str, str]]:
    """Every field, in the order the progress steps announce them; the formats left out, with why."""
    hip = getattr(torch.version, "hip", None) or ""
    step("memory")
    props = torch.cuda.get_device_properties(dev)
    total, free = device_memory(dev)
    side = torch.cuda.Stream(dev)
    compute = torch.cuda.current_stream(dev)
    step("link")
    link = measure_link(dev, side, schedule)
    step("device memory")
    memcpy_gbps = measure_memcpy_gbps(dev, compute, schedule)
    matmul = {}
    for d in COMPUTE_DTYPES:
        step(f"matmul {d}")
        matmul[d] = measure_matmul(dev, compute, d, schedule)
    step(SMALL_STEP)
    small = {d: measure_matmul(dev, compute, d, schedule, schedule.matmul_small_dim) for d in GPU_SMALL_DTYPES}
    dequant, dequant_call, not_measured = measure_dequant_rates(dev, compute, formats, schedule, step)
    step("overlap")
    overlap = measure_overlap(dev, side, schedule)
    copy_slowdown, compute_slowdown = measure_interference(dev, side, schedule)
    step("launch overhead")
    launch_us = measure_launch_us(dev)
    elementwise = measure_elementwise(dev, compute, schedule)
    found = Measurements(
        name=props.name, vendor="AMD" if hip else "NVIDIA", backend="rocm" if hip else "cuda",
        driver=driver_version(), memory_total_bytes=total, memory_reserve_bytes=GPU_RESERVE_BYTES,
        memory_usable_bytes=max(1, free - GPU_RESERVE_BYTES), link=link, device_memory_gbps=memcpy_gbps,
        matmul_tflops=matmul, matmul_weight_dim=schedule.matmul_dim, matmul_small_tflops=small,
        matmul_small_weight_dim=schedule.matmul_small_dim, dequant_gweights_per_s=dequant,
        dequant_call_us=dequant_call, copy_compute_overlap=overlap, copy_slowdown=copy_slowdown, compute_slowdown=compute_slowdown,
        launch_overhead_us=launch_us, elementwise_gelems_per_s=elementwise, compute_threads=0,
    )
    return found, not_measured


def measure(index: int, quick: bool, progress: ProgressFn | None = None, source: str | None = None) -> DeviceProfile:
    """GPU `index` (CUDA or ROCm) measured (`quick`: the QUICK schedule) into a profile; `source` is the
    command recorded in every provenance."""
    schedule = QUICK if quick else FULL
    dev = torch.device("cuda", index)
    source = source or f"residency profile --device cuda:{index}{' --quick' if quick else ''}"
    formats = measured_formats()
    step = Steps(formats, COMPUTE_DTYPES, progress, matmul_extra=(SMALL_STEP,))
    with torch.cuda.device(dev):
        found, not_measured = measure_all(dev, schedule, formats, step)
        torch.cuda.empty_cache()
    step.finish()
    return to_profile(found, source, provenance_notes(schedule, not_measured))
