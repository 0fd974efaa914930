"""`measure_profile(device, quick)`: measure this machine's CPU backend or one GPU into a DeviceProfile.

Picks the CPU or the torch.cuda (CUDA or ROCm) measurement; a GPU asked for but absent is a user error.
"""

from __future__ import annotations

import torch

from residency.device.profile import DeviceProfile
from residency.device.timing import ProgressFn
from residency.errors import ResidencyError, UsageError

# Bumped whenever a measurement method changes (what is timed, or how): a profile cached by an older method is
# then measured again instead of silently planning with figures the cost model no longer means the same way.
# 2: cache-cold link and matmul, small-weight matmul curve, elementwise rate by tensor size, per-op dispatch.
# 3: the op mix counted without its own .to("meta") copy.
# 4: the CPU overlap's copies come from a cache-cold store, as the runtime's loads do.
# 5: the CPU copies run on the runtime's own copy worker (its hand-off measured ~1/4 slower at 64 KiB than the
#    queue-only thread it replaced, which small-transfer link figures now include, as the runtime pays it).
# 6: each engine's slowdown beside the other (copy_slowdown, compute_slowdown), timed with a block-shaped probe.
# 7: the CPU's small-weight matmul curve for every compute dtype, not fp32 only.
# 8: the CPU's attention rate (scaled_dot_product_attention over query rows) and the re-warm cost after a matmul.
# 9: the per-call cost of an unpack (dequant_call_us), timed on a small matrix beside the rate's large one.
# 10: the CPU's conv2d rate over kernel size (conv_tflops): a VAE's thin convs ran 2-5× slower than the matmul model.
# 11: the CPU's unpack rate over tensor size (dequant_tensor_gweights_per_s), its packed input from DRAM: a small
#     model's tensors unpacked 1.4× faster than the rate timed on an 8M-weight matrix predicted.
# 12: the CPU's unpack from a just-copied slot against one from DRAM (dequant_fresh_factor): a streamed block's
#     Q8_0 unpack ran 6-10 % faster than the curve (cold input) predicted, BF16 → fp32 12-29 %.
# 13: the CPU's unpack probes write outputs rotating through 8 MiB (one output reused stayed in L2: Q8_0 ran 1.25×
#     faster than into the scratch a block before had written), and the fresh factor's slot is copied by the copy
#     thread, on the other core, as the runtime's loads are (copied by the timing thread, the input sat in its L2);
#     the copy thread runs on one intra-op thread, as the runtime's does (it had every core's: the link and the
#     interference were timed with multi-threaded copies the runtime never makes).
# 14: the unpack probes time the runtime's unchecked call (StagedUnpack), not fmt.unpack with its argument checks
#     (~3.6 µs more a call on this EPYC: a small model's 21-tensor BF16 block was priced ~3× its unpack).
MEASUREMENT_VERSION = 14


def default_device() -> str:
    """`cuda:0` when torch sees a GPU (CUDA or ROCm), else `cpu`."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def parse_device(device: str) -> tuple[str, int]:
    """("cpu", 0) or ("cuda", index) from `cpu`, `cuda` or `cuda:N` (ROCm GPUs are `cuda` in torch too)."""
    text = device.strip().lower()
    if text == "cpu":
        return "cpu", 0
    kind, _, index = text.partition(":")
    if kind == "cuda" and (index == "" or index.isdigit()):
        return "cuda", int(index or 0)
    raise UsageError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N (ROCm GPUs are cuda:N too)")


def measure_profile(device: str, quick: bool, progress: ProgressFn | None = None,
                    source: str | None = None) -> DeviceProfile:
    """Measure `device`; `source` is the command recorded in every number's provenance."""
    kind, index = check_measurable(device)
    if kind == "cpu":
        from residency.device import measure_cpu

        return measure_cpu.measure(quick, progress, source)
    from residency.device import measure_cuda

    return measure_cuda.measure(index, quick, progress, source)


def check_measurable(device: str) -> tuple[str, int]:
    """parse_device's (kind, index), once the device is known to be there: ResidencyError for a GPU torch does not
    see (before any progress display: its line was left blank on stderr above the error)."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return kind, index
    if not torch.cuda.is_available():
        raise ResidencyError(f"cannot measure {device}: torch sees no CUDA or ROCm GPU "
                             f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
                             f"HIP {getattr(torch.version, 'hip', None) or 'none'})",
                             hint="measure the CPU backend with --device cpu, or install a CUDA/ROCm build of torch")
    if index >= torch.cuda.device_count():
        raise ResidencyError(f"cannot measure {device}: only {torch.cuda.device_count()} GPU(s) visible",
                             hint="pick one of " + ", ".join(f"cuda:{i}" for i in range(torch.cuda.device_count())))
    return kind, index
