"""Measure a CUDA or ROCm GPU through torch.cuda: link curves, memory, matmul, dequant, overlap, launches.

Copies run on a side stream from pinned (or pageable) host buffers and are timed with CUDA events.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
import time
from dataclasses import dataclass

import torch

from residency.device.bench_inputs import MIX_CHANNELS, count_op_mix, measured_formats, op_mix, packed_sample
from residency.device.profile import COMPUTE_DTYPES, Curve, DeviceProfile, Provenance
from residency.device.timing import ProgressFn, Steps, Timing, overlap_fraction, summarize
from residency.formats import get_format

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KIB, MIB = 2**10, 2**20
# Kept free beyond what the driver reports in use: allocator fragmentation and cuBLAS/hipBLAS workspaces.
GPU_RESERVE_BYTES = 512 * MIB


@dataclass(frozen=True)
class GpuPlan:
    link_sizes_bytes: tuple[int, ...]
    link_repeats: int
    memcpy_bytes: int
    matmul_dim: int
    matmul_rows: tuple[int, ...]
    matmul_repeats: int
    dequant_shape: tuple[int, int]
    dequant_repeats: int
    overlap_copy_bytes: int
    overlap_repeats: int
    matmul_small_dim: int = 256  # a second, small weight: small matrices leave much of a GPU idle


QUICK = GpuPlan((64 * KIB, MIB, 16 * MIB, 64 * MIB), 5, 128 * MIB, 2048, (16, 256, 4096), 5,
                (1024, 4096), 5, 64 * MIB, 3)
FULL = GpuPlan((64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB), 15, 512 * MIB, 4096,
               (16, 64, 256, 512, 4096), 15, (4096, 4096), 15, 256 * MIB, 7)


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


def measure_link(dev: torch.device, side: torch.cuda.Stream, plan: GpuPlan) -> dict[str, Curve]:
    largest = max(plan.link_sizes_bytes)
    device_buf = torch.empty(largest, dtype=torch.uint8, device=dev)
    curves = {}
    for pinned in (True, False):
        host = torch.empty(largest, dtype=torch.uint8, pin_memory=pinned).fill_(1)
        for direction in ("h2d", "d2h"):
            gbps, spread = [], []
            for n in plan.link_sizes_bytes:
                src, dst = (host[:n], device_buf[:n]) if direction == "h2d" else (device_buf[:n], host[:n])
                t = time_events(lambda s=src, d=dst: d.copy_(s, non_blocking=True), plan.link_repeats, side)
                gbps.append(n / t.median_s / 1e9)
                spread.append(round(t.spread, 4))
            key = f"{direction}_{'pinned' if pinned else 'pageable'}"
            curves[key] = Curve(tuple(float(n) for n in plan.link_sizes_bytes), tuple(gbps), tuple(spread))
        del host
    return curves


def measure_memcpy_gbps(dev: torch.device, stream: torch.cuda.Stream, plan: GpuPlan) -> float:
    src = torch.ones(plan.memcpy_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = time_events(lambda: dst.copy_(src), 10, stream)
    return 2 * plan.memcpy_bytes / t.median_s / 1e9  # bytes read plus bytes written


def measure_matmul(dev: torch.device, stream: torch.cuda.Stream, dtype: str, plan: GpuPlan,
                   dim: int | None = None) -> Curve:
    dim, tdtype = dim or plan.matmul_dim, TORCH_DTYPES[dtype]
    w = torch.randn(dim, dim, device=dev, dtype=tdtype)
    xs, ys, spread = [], [], []
    for rows in plan.matmul_rows:
        x = torch.randn(rows, dim, device=dev, dtype=tdtype)
        out = torch.empty(rows, dim, device=dev, dtype=tdtype)
        t = time_events(lambda x=x, out=out: torch.matmul(x, w, out=out), plan.matmul_repeats, stream, warmup=3)
        xs.append(float(rows))
        ys.append(2.0 * rows * dim * dim / t.median_s / 1e12)
        spread.append(round(t.spread, 4))
    return Curve(tuple(xs), tuple(ys), tuple(spread))


def measure_dequant(dev: torch.device, stream: torch.cuda.Stream, name: str, plan: GpuPlan) -> float:
    fmt = get_format(name)
    rows, cols = plan.dequant_shape
    packed = packed_sample(fmt, rows, cols).to(dev)  # packed on the host, unpacked on the device
    out = torch.empty(rows, cols, dtype=torch.bfloat16, device=dev)
    t = time_events(lambda: fmt.unpack(packed, out), plan.dequant_repeats, stream, warmup=2)
    return rows * cols / t.median_s / 1e9


def measure_dequant_rates(dev: torch.device, stream: torch.cuda.Stream, formats: list[str], plan: GpuPlan,
                          step) -> tuple[dict[str, float], dict[str, str]]:
    """(rate per format, why not measured per format). A format whose pack or unpack needs a package this
    machine lacks (NF4 without bitsandbytes) is left out with the reason: the rest of the profile stands,
    and planning with that format then asks for a profile that has it."""
    rates, missing = {}, {}
    for f in formats:
        step(f"dequant {f}")
        try:
            rates[f] = measure_dequant(dev, stream, f, plan)
        except ModuleNotFoundError as e:
            missing[f] = f"needs the {e.name or 'missing'} package, not installed here"
    return rates, missing


def measure_overlap(dev: torch.device, side: torch.cuda.Stream, plan: GpuPlan) -> float:
    """Side-stream h2d copy alone, a matmul loop alone, then both at once (host clock, synchronized)."""
    host = torch.empty(plan.overlap_copy_bytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    dst = torch.empty(plan.overlap_copy_bytes, dtype=torch.uint8, device=dev)
    dim = plan.matmul_dim
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

    samples = [(wall(copy), wall(compute_loop), wall(both)) for _ in range(plan.overlap_repeats)]
    med = [summarize([s[i] for s in samples]).median_s for i in range(3)]
    return overlap_fraction(*med)


# Activation sizes of the mix: 4 k to 16 M elements a tensor (a 16-token frame up to Flux's 4096 × 3072), the
# size classes of residency.workload.op_count.
_MIX_TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536)


def measure_elementwise(dev: torch.device, stream: torch.cuda.Stream, plan: GpuPlan) -> Curve:
    """1e9 activation elements/s of the non-matmul op mix in bf16 over the size class of its tensors:
    device time (the host's launch time is the launch-overhead figure's, and the cost model takes the larger
    of the two), elements counted on the meta device as a workload's blocks are. Small tensors run at
    kernel latency, not at the memory bandwidth: that is the point of measuring them."""
    side = plan.matmul_dim
    a = torch.randn(side, side, device=dev, dtype=torch.bfloat16)
    cover_out = torch.empty_like(a)

    def cover() -> None:  # ~2·side³ FLOPs: milliseconds on any GPU, longer than launching the mix
        torch.matmul(a, a, out=cover_out)

    classes, rates = [], []
    for tokens in _MIX_TOKENS:
        x = torch.randn(1, tokens, MIX_CHANNELS, device=dev, dtype=torch.bfloat16)
        counter = count_op_mix(tuple(x.shape), torch.bfloat16)
        t = time_events(lambda x=x: op_mix(x), plan.matmul_repeats, stream, cover=cover)
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


def measure(index: int, quick: bool, progress: ProgressFn | None = None, source: str | None = None) -> DeviceProfile:
    plan = QUICK if quick else FULL
    dev = torch.device("cuda", index)
    source = source or f"residency profile --device cuda:{index}{' --quick' if quick else ''}"
    hip = getattr(torch.version, "hip", None) or ""
    formats = measured_formats()
    step = Steps(formats, COMPUTE_DTYPES, progress, matmul_extra=(SMALL_STEP,))

    with torch.cuda.device(dev):
        step("memory")
        props = torch.cuda.get_device_properties(dev)
        total, free = device_memory(dev)
        side = torch.cuda.Stream(dev)
        compute = torch.cuda.current_stream(dev)
        step("link")
        link = measure_link(dev, side, plan)
        step("device memory")
        memcpy_gbps = measure_memcpy_gbps(dev, compute, plan)
        matmul = {}
        for d in COMPUTE_DTYPES:
            step(f"matmul {d}")
            matmul[d] = measure_matmul(dev, compute, d, plan)
        step(SMALL_STEP)
        small = {d: measure_matmul(dev, compute, d, plan, plan.matmul_small_dim) for d in GPU_SMALL_DTYPES}
        dequant, not_measured = measure_dequant_rates(dev, compute, formats, plan, step)
        step("overlap")
        overlap = measure_overlap(dev, side, plan)
        step("launch overhead")
        launch_us = measure_launch_us(dev)
        elementwise = measure_elementwise(dev, compute, plan)
        torch.cuda.empty_cache()
    step.finish()

    def measured(note: str) -> Provenance:
        return Provenance("measured", f"{source} — {note}")

    rows, cols = plan.dequant_shape
    provenance = {
        "memory": measured(f"torch.cuda.mem_get_info; usable = free − {GPU_RESERVE_BYTES} B reserve"),
        "link": measured("non_blocking copies on a side stream, CUDA events"),
        "device_memory_gbps": measured(f"{plan.memcpy_bytes} B device-to-device copy, read + write bytes counted"),
        "matmul_tflops": measured(f"x (rows × {plan.matmul_dim}) @ W ({plan.matmul_dim}²), CUDA events"),
        "dequant_gweights_per_s": measured(f"unpack of a {rows}×{cols} matrix into bf16 on the device"
                                           + "".join(f"; {f} not measured: {why}" for f, why in not_measured.items())),
        "copy_compute_overlap": measured("side-stream h2d copy alone, bf16 matmul loop alone, both at once"),
        "launch_overhead_us": measured("1000 in-place adds on a 1-element tensor"),
        "matmul_small_tflops": measured(f"as matmul_tflops, with {plan.matmul_small_dim}² weights, "
                                        f"{' and '.join(GPU_SMALL_DTYPES)}"),
        "elementwise_gelems_per_s": measured("a norm/elementwise/softmax mix in bf16 on 4 k to 16 M-element "
                                             "tensors, CUDA events; elements counted on the meta device"),
    }
    return DeviceProfile(
        name=props.name,
        vendor="AMD" if hip else "NVIDIA",
        backend="rocm" if hip else "cuda",
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda or "",
        hip_version=hip,
        driver=driver_version(),
        date=datetime.date.today().isoformat(),
        memory_total_bytes=total,
        memory_reserve_bytes=GPU_RESERVE_BYTES,
        memory_usable_bytes=max(1, free - GPU_RESERVE_BYTES),
        link=link,
        device_memory_gbps=memcpy_gbps,
        matmul_tflops=matmul,
        dequant_gweights_per_s=dequant,
        copy_compute_overlap=overlap,
        launch_overhead_us=launch_us,
        compute_threads=0,
        provenance=provenance,
        matmul_weight_dim=plan.matmul_dim,
        matmul_small_tflops=small,
        matmul_small_weight_dim=plan.matmul_small_dim,
        elementwise_gelems_per_s=elementwise,
    )
