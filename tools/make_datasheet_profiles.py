"""Generate the shipped datasheet profiles (profiles/*.json) from spec-sheet numbers and a stated derating.

Every figure is a vendor/database peak with its source, turned into an achievable rate by the model below.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profiles import profiles_dir  # noqa: E402
from residency.device.profile import COMPUTE_DTYPES, LINK_DIRECTIONS, Curve, DeviceProfile, Provenance  # noqa: E402
from residency.device.profile_io import save_profile  # noqa: E402
from residency.formats import COMPUTE_DTYPE_BYTES, FORMATS  # noqa: E402

GIB = 2**30
# ---- the derating model (each constant is an assumption, stated; a measurement replaces it) ----
PCIE_X16_GBPS = {4: 31.5, 5: 63.0}  # theoretical per direction after 128b/130b encoding, GB/s
PINNED_FRACTION = 0.80  # DMA from page-locked memory reaches ~80 % of the link
PAGEABLE_FRACTION = 0.45  # pageable copies are staged through a driver bounce buffer
LINK_LATENCY_S = 10e-6  # per-transfer set-up (launch + DMA start): t(bytes) = latency + bytes / peak
LINK_SIZES_BYTES = (64 * 2**10, 256 * 2**10, 2**20, 4 * 2**20, 16 * 2**20, 64 * 2**20, 256 * 2**20)
DEVICE_MEMORY_FRACTION = 0.85  # achievable share of the spec memory bandwidth in a streaming copy
MATMUL_ROWS = (16, 64, 256, 512, 4096)
DEQUANT_EFFICIENCY = 0.7  # plain casts, FP8 and the legacy block quants: near memory-bound
DEQUANT_EFFICIENCY_HEAVY = 0.5  # K-quants (nested scales) and NF4 (table lookup) do more integer work
HEAVY_FORMATS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "NF4")
DEQUANT_OUT_BYTES = 2  # bf16 output written per weight
OVERLAP = {"cuda": 0.9, "rocm": 0.8}  # assumed until `residency profile` measures the card
LAUNCH_US = {"cuda": 5.0, "rocm": 8.0}  # assumed host cost per kernel launch
MEMORY_RESERVE_BYTES = 1 * GIB  # desktop compositor, driver and context on a card that drives a display
# ---- what execution modes cost (BlockPlan.exec_mode), each figure from a public measurement ----
# Host µs per kernel when a block's kernels replay as one captured graph. CUDA: a chain of N kernels replayed
# as a graph cost ~15 µs fixed + ~0.58 µs per node against ~6.4 µs per individual launch (RTX 5070 Ti,
# CUDA 13.3), https://github.com/ahrefs/ocannl/issues/488 ; rounded up to 0.6. HIP: 941 dispatches replayed
# as a graph took 3.865 µs each on gfx1100 (Radeon Pro W7900, RDNA 3 like the RX 7800 XT), 4.4x Vulkan's,
# https://github.com/ROCm/rocm-systems/issues/10834 ; rounded up to 3.9 for every ROCm card.
GRAPH_REPLAY_US = {"cuda": 0.6, "rocm": 3.9}
GRAPH_REPLAY_SOURCES = {"cuda": "https://github.com/ahrefs/ocannl/issues/488",
                        "rocm": "https://github.com/ROCm/rocm-systems/issues/10834"}
# Kernels a torch.compile'd (inductor) block still launches, as a fraction of eager's: inductor fuses chains
# of pointwise ops into one Triton kernel (rotary embedding: 4 eager kernels -> 2,
# https://github.com/pytorch/pytorch/issues/141265 ; GELU, mul and a view -> 1 kernel,
# https://github.com/huggingface/blog/pull/3408), matmuls stay library calls. 0.5 taken for a whole block.
COMPILED_DISPATCH_FRACTION = 0.5
COMPILED_SOURCES = ("https://github.com/pytorch/pytorch/issues/141265", "https://github.com/huggingface/blog/pull/3408")
# One cold inductor compile of the shipped model's DiT block class took 23 s on a 2-core CPU host
# (tools/bench_compile.py); taken as the per-class figure (a GPU host compiles Triton kernels instead of C++,
# with more cores: an upper figure). Read from inductor's disk cache after the first time.
COMPILE_S_PER_BLOCK_CLASS = 23.0
# A captured graph's private pool: PyTorch's CUDA caching allocator packs large allocations into 20 MiB segments
# (kLargeBuffer) and small ones into 2 MiB segments (kSmallBuffer), and a graph's pool is not shared with eager
# work, https://github.com/pytorch/pytorch/blob/main/c10/cuda/CUDACachingAllocator.cpp ; one of each per
# class on top of the class's activations.
GRAPH_POOL_BYTES_PER_CLASS = 22 * 2**20


@dataclass(frozen=True)
class CardSpec:
    slug: str  # file stem in profiles/
    name: str
    vendor: str
    backend: str  # "cuda" | "rocm"
    memory_gib: int
    memory_gbps: float  # spec memory bandwidth, GB/s
    pcie_gen: int
    pcie_lanes: int
    tensor_fp16_tflops: float  # dense FP16/BF16 matrix peak (NVIDIA: with FP32 accumulate, as torch uses)
    fp32_tflops: float  # non-tensor FP32 peak
    matmul_efficiency: float  # achieved share of the peak at 4096 rows
    efficiency_note: str
    sources: tuple[str, ...]
    spec_note: str  # how the compute peaks were read or derived


_NV_EFF = "0.6 of the dense tensor peak at 4096 rows (cuBLAS on large GEMMs)"
_AMD_EFF = "0.5 of the quoted peak at 4096 rows: AMD's FP16/FP32 peaks count dual-issue, which hipBLASLt rarely sustains"

CARDS = (
    CardSpec("rx-7800-xt", "Radeon RX 7800 XT", "AMD", "rocm", 16, 624.0, 4, 16, 74.6, 37.3, 0.5, _AMD_EFF,
             ("https://www.gpu-monkey.com/en/gpu-amd_radeon_rx_7800_xt",
              "https://cputronic.com/gpu/amd-radeon-rx-7800-xt"),
             "16 GB GDDR6 at 624 GB/s, PCIe 4.0 x16; FP32 37.3 TFLOPS; FP16 = 2 × FP32 on RDNA 3 (WMMA)"),
    CardSpec("rx-7900-xtx", "Radeon RX 7900 XTX", "AMD", "rocm", 24, 960.0, 4, 16, 122.9, 61.4, 0.5, _AMD_EFF,
             ("https://www.guru3d.com/review/powercolor-radeon-rx-7900-xtx-hellhound-spectral-white-review/page-4/",
              "https://hmc-tech.com/gpu/amd-radeon-rx-9070-xt-vs-amd-radeon-rx-7900-xtx"),
             "24 GB GDDR6 at 960 GB/s, PCIe 4.0 x16; FP32 61.4 TFLOPS, FP16 122.9 TFLOPS"),
    CardSpec("rx-9070-xt", "Radeon RX 9070 XT", "AMD", "rocm", 16, 640.0, 5, 16, 194.7, 48.7, 0.5, _AMD_EFF,
             ("https://multiplayer.it/notizie/amd-radeon-rx-9070-xt-rx-9070-specifiche.html",
              "https://www.purepc.pl/amd-radeon-rx-9070-xt-oraz-radeon-rx-9070-specyfikacja-cena-i-wydajnosc-kart-graficznych-rdna-4"),
             "16 GB GDDR6 at 640 GB/s, PCIe 5.0 x16; FP32 48.7 TFLOPS; dense FP16 matrix = INT8 779 sparse TOPS / 4"),
    CardSpec("rtx-5090", "GeForce RTX 5090", "NVIDIA", "cuda", 32, 1792.0, 5, 16, 209.5, 104.8, 0.6, _NV_EFF,
             ("https://pocketmags.com/linux-format-magazine/may-2025/articles/nvidia-geforce-rtx-5090",
              "https://www.spheron.network/blog/nvidia-rtx-5090-specs/"),
             "32 GB GDDR7 at 1792 GB/s, PCIe 5.0 x16; FP32 104.8 TFLOPS; dense FP16 with FP32 accumulate = "
             "838 sparse FP16 TFLOPS / 4 (GeForce runs FP32 accumulate at half rate)"),
    CardSpec("rtx-4090", "GeForce RTX 4090", "NVIDIA", "cuda", 24, 1008.0, 4, 16, 165.2, 82.6, 0.6, _NV_EFF,
             ("https://gfxspeak.com/featured/nvidias-latest-lovelace/",
              "https://www.scribd.com/document/656196379/004 (NVIDIA Ada GPU architecture whitepaper)"),
             "24 GB GDDR6X at 1008 GB/s, PCIe 4.0 x16; FP32 82.6 TFLOPS; dense FP16 with FP32 accumulate "
             "165.2 TFLOPS (512 tensor cores × 128 FLOP/clk × 2.52 GHz)"),
    CardSpec("rtx-4060-ti-16gb", "GeForce RTX 4060 Ti 16GB", "NVIDIA", "cuda", 16, 288.0, 4, 8, 44.1, 22.1, 0.6,
             _NV_EFF,
             ("https://cputronic.com/gpu/nvidia-geforce-rtx-4060-ti-16-gb",
              "https://www.guru3d.com/story/geforce-rtx-4060-ti-gpu-pictured/"),
             "16 GB GDDR6 at 288 GB/s, PCIe 4.0 x8 (half the lanes of its slot); FP32 22.1 TFLOPS; dense FP16 "
             "with FP32 accumulate 44.1 TFLOPS (136 tensor cores × 128 FLOP/clk × 2.535 GHz)"),
    CardSpec("rtx-3060-12gb", "GeForce RTX 3060 12GB", "NVIDIA", "cuda", 12, 360.0, 4, 16, 25.5, 12.7, 0.6,
             _NV_EFF,
             ("https://www.guru3d.com/story/geforce-rtx-4060-ti-gpu-pictured/",
              "https://pcpartdb.com/gpus/view/nvidia-geforce-rtx-3060-12-gb-ga104"),
             "12 GB GDDR6 at 360 GB/s, PCIe 4.0 x16; FP32 12.7 TFLOPS; dense FP16 with FP32 accumulate "
             "25.5 TFLOPS (112 tensor cores × 128 FLOP/clk × 1.777 GHz)"),
)


def pcie_gbps(gen: int, lanes: int) -> float:
    """Theoretical one-direction PCIe bandwidth in GB/s."""
    return PCIE_X16_GBPS[gen] * lanes / 16


def link_curve(peak_gbps: float) -> Curve:
    """Achieved GB/s over transfer size for t = LINK_LATENCY_S + bytes / peak."""
    ys = tuple(n / (LINK_LATENCY_S + n / (peak_gbps * 1e9)) / 1e9 for n in LINK_SIZES_BYTES)
    return Curve(tuple(float(n) for n in LINK_SIZES_BYTES), ys)


def matmul_curve(peak_tflops: float, efficiency: float, memory_gbps: float, weight_bytes: int) -> Curve:
    """Roofline over rows: min(efficiency × peak, rows·2 FLOP per weight read at `memory_gbps`).

    x (rows × dim) @ W (dim × dim) reads dim² weights for 2·rows·dim² FLOPs, so few rows are weight-bound.
    """
    ys = tuple(min(peak_tflops * efficiency, memory_gbps * 1e9 * 2 * rows / weight_bytes / 1e12)
               for rows in MATMUL_ROWS)
    return Curve(tuple(float(r) for r in MATMUL_ROWS), ys)


def dequant_gweights_per_s(fmt_name: str, memory_gbps: float) -> float:
    """Memory-bound rate (read packed bytes, write a bf16 weight) × the format's efficiency, in 1e9 weights/s."""
    fmt = FORMATS[fmt_name]
    bytes_per_weight = fmt.block_bytes / fmt.block_weights + DEQUANT_OUT_BYTES
    efficiency = DEQUANT_EFFICIENCY_HEAVY if fmt_name in HEAVY_FORMATS else DEQUANT_EFFICIENCY
    return memory_gbps * efficiency / bytes_per_weight


def build_profile(card: CardSpec, date: str) -> DeviceProfile:
    source = "; ".join(card.sources) + f" — {card.spec_note}"
    link_peak = pcie_gbps(card.pcie_gen, card.pcie_lanes)
    memory_gbps = card.memory_gbps * DEVICE_MEMORY_FRACTION
    pinned, pageable = link_curve(link_peak * PINNED_FRACTION), link_curve(link_peak * PAGEABLE_FRACTION)
    link = {d: pinned if d.endswith("pinned") else pageable for d in LINK_DIRECTIONS}
    peaks = {"bf16": card.tensor_fp16_tflops, "fp16": card.tensor_fp16_tflops, "fp32": card.fp32_tflops}
    matmul = {d: matmul_curve(peaks[d], card.matmul_efficiency, memory_gbps, COMPUTE_DTYPE_BYTES[d])
              for d in COMPUTE_DTYPES}
    total = card.memory_gib * GIB

    def sheet(derating: str) -> Provenance:
        return Provenance("datasheet", source, derating)

    provenance = {
        "memory": sheet(f"{card.memory_gib} GiB total; reserve {MEMORY_RESERVE_BYTES // 2**20} MiB for the desktop "
                        "and driver; usable = total − reserve"),
        "link": sheet(f"PCIe {card.pcie_gen}.0 x{card.pcie_lanes} = {link_peak:.2f} GB/s theoretical; pinned × "
                      f"{PINNED_FRACTION}, pageable × {PAGEABLE_FRACTION}; t = {LINK_LATENCY_S * 1e6:.0f} µs + "
                      "bytes / peak; d2h assumed equal to h2d"),
        "device_memory_gbps": sheet(f"{card.memory_gbps} GB/s spec × {DEVICE_MEMORY_FRACTION}"),
        "matmul_tflops": sheet(f"bf16/fp16: {card.tensor_fp16_tflops} TFLOPS dense tensor peak, fp32: "
                               f"{card.fp32_tflops} TFLOPS non-tensor; {card.efficiency_note}; at few rows bounded "
                               "by reading the weights at the derated memory bandwidth"),
        "dequant_gweights_per_s": sheet(f"memory-bound rate (packed bytes + {DEQUANT_OUT_BYTES} B bf16 out per "
                                        f"weight at the derated bandwidth) × {DEQUANT_EFFICIENCY}, × "
                                        f"{DEQUANT_EFFICIENCY_HEAVY} for {', '.join(HEAVY_FORMATS)}"),
        "copy_compute_overlap": sheet(f"assumed {OVERLAP[card.backend]} for {card.backend}; replace with "
                                      "`residency profile` on the card"),
        "launch_overhead_us": sheet(f"assumed {LAUNCH_US[card.backend]} µs per launch for {card.backend}"),
        **_exec_mode_provenance(card.backend),
    }
    return DeviceProfile(
        name=card.name, vendor=card.vendor, backend=card.backend, torch_version="", cuda_version="",
        hip_version="", driver="", date=date,
        memory_total_bytes=total, memory_reserve_bytes=MEMORY_RESERVE_BYTES,
        memory_usable_bytes=total - MEMORY_RESERVE_BYTES,
        link=link, device_memory_gbps=memory_gbps, matmul_tflops=matmul,
        dequant_gweights_per_s={f: dequant_gweights_per_s(f, memory_gbps) for f in FORMATS},
        copy_compute_overlap=OVERLAP[card.backend], launch_overhead_us=LAUNCH_US[card.backend],
        provenance=provenance,
        graph_replay_us_per_kernel=GRAPH_REPLAY_US[card.backend],
        compiled_dispatch_fraction=COMPILED_DISPATCH_FRACTION,
        compile_s_per_block_class=COMPILE_S_PER_BLOCK_CLASS,
        graph_pool_bytes_per_class=GRAPH_POOL_BYTES_PER_CLASS,
    )


def _exec_mode_provenance(backend: str) -> dict[str, Provenance]:
    """Where each execution-mode figure of a `backend` card comes from (see the constants above)."""
    return {
        "graph_replay_us_per_kernel": Provenance(
            "datasheet", GRAPH_REPLAY_SOURCES[backend],
            f"measured graph replay per node on a {'gfx1100 (RDNA 3)' if backend == 'rocm' else 'RTX 5070 Ti'}, "
            f"rounded up to {GRAPH_REPLAY_US[backend]} µs; simulated, unverified on this card"),
        "compiled_dispatch_fraction": Provenance(
            "datasheet", "; ".join(COMPILED_SOURCES),
            f"inductor fuses pointwise chains (4 -> 2 and 3 -> 1 kernels in the sources); "
            f"{COMPILED_DISPATCH_FRACTION} of eager's launches assumed for a whole block"),
        "compile_s_per_block_class": Provenance(
            "datasheet", "tools/bench_compile.py (cold inductor compile, 2-core CPU host)",
            f"{COMPILE_S_PER_BLOCK_CLASS:g} s per block class, once per machine (inductor's disk cache)"),
        "graph_pool_bytes_per_class": Provenance(
            "datasheet", "https://github.com/pytorch/pytorch/blob/main/c10/cuda/CUDACachingAllocator.cpp",
            "one 20 MiB large segment + one 2 MiB small segment per graphed class, beyond its activations"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=profiles_dir(), help="directory to write <slug>.json into")
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="ISO date the specs were looked up")
    args = ap.parse_args(argv)
    for card in CARDS:
        path = save_profile(build_profile(card, args.date), args.out / f"{card.slug}.json")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
