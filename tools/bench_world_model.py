"""Benchmark: the world model's speed on this CPU (tiny) and its cost per latent frame (large presets).

Measured: latent frames/s and ms per component for `tiny`. Counted on the meta device: FLOPs
and weight/KV bytes per latent frame, the arithmetic intensity, and whether a frame is FLOP- or
bandwidth-bound on two consumer GPUs at their peak rates. A human table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipelines.world_model import KVCache, WorldModelPipeline  # noqa: E402


@dataclass(frozen=True)
class DevicePeak:
    matmul_flops_per_s: float  # dense 16-bit matrix peak
    memory_bytes_per_s: float  # DRAM bandwidth
    source: str  # what the figure is


DEVICES: dict[str, DevicePeak] = {
    "RTX 5090": DevicePeak(209.5e12, 1792e9, "dense BF16 tensor (no sparsity), GDDR7 1792 GB/s"),
    # RDNA3 WMMA: 512 FP16 FLOP/clk/CU dense x 60 CU x 2.43 GHz boost = 74.6 TFLOPS.
    "RX 7800 XT": DevicePeak(74.6e12, 624e9, "FP16 WMMA dense at 2.43 GHz boost, GDDR6 624 GB/s"),
}
WEIGHT_BYTES = 2  # bf16 weights resident on the device (no quantized streaming)


# --- measured: tiny on this CPU ---------------------------------------------
class _Timer:
    """Forward hooks on the DiT and the decoder; the CPU runs synchronously, so wall time is compute."""

    def __init__(self, pipe: WorldModelPipeline):
        self.samples: dict[str, list[float]] = {"dit_step": [], "cache_write": [], "decode": []}
        self._t0 = 0.0
        self._handles = [
            pipe.dit.register_forward_pre_hook(self._start),
            pipe.dit.register_forward_hook(self._stop_dit, with_kwargs=True),
            pipe.vae.decoder.register_forward_pre_hook(self._start),
            pipe.vae.decoder.register_forward_hook(lambda *_: self._stop("decode")),
        ]

    def _start(self, *_):
        self._t0 = time.perf_counter()

    def _stop(self, key: str) -> None:
        self.samples[key].append((time.perf_counter() - self._t0) * 1e3)

    def _stop_dit(self, _module, _args, kwargs, _out):
        self._stop("dit_step" if kwargs.get("output", True) else "cache_write")

    def clear(self) -> None:
        for v in self.samples.values():
            v.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def measure_tiny(frames: int, warmup: int) -> dict:
    pipe = WorldModelPipeline.from_config("tiny")
    c = pipe.config
    image = np.random.default_rng(0).integers(0, 256, (c.height, c.width, 3), dtype=np.uint8)
    encode_ms = []
    for _ in range(3):
        t0 = time.perf_counter()
        session = pipe.start(image, seed=0)
        encode_ms.append((time.perf_counter() - t0) * 1e3)
    timer = _Timer(pipe)
    for i in range(warmup + c.context_frames):  # fill the cache: steady-state reads are full-window
        session.step(i % len(c.actions))
    timer.clear()
    t0 = time.perf_counter()
    for i in range(frames):
        session.step(i % len(c.actions))
    frame_ms = (time.perf_counter() - t0) * 1e3 / frames
    timer.remove()
    med = {k: statistics.median(v) for k, v in timer.samples.items()}
    return {
        "latent_fps": 1e3 / frame_ms,
        "video_fps": 1e3 / frame_ms * c.temporal_compression,
        "frame_ms": frame_ms,
        "start_ms": statistics.median(encode_ms),  # encode + anchor cache write
        "dit_step_ms": med["dit_step"],
        "cache_write_ms": med["cache_write"],
        "decode_ms": med["decode"],
        "steps": c.steps,
        "threads": torch.get_num_threads(),
    }


# --- counted: FLOPs and bytes on the meta device ----------------------------
def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def count_frame(name: str) -> dict:
    """Per-phase FLOPs and bytes with the KV window full (steady state), bf16 everywhere."""
    dtype = torch.bfloat16
    pipe = WorldModelPipeline.from_config(name, device="meta", dtype=dtype)
    c = pipe.config
    cache = KVCache(c, device="meta", compute_dtype=dtype)
    for frame in range(c.context_frames):
        cache.begin_write(frame)
        cache.end_write()
    latent = torch.empty(1, c.latent_channels, c.latent_height, c.latent_width, device="meta", dtype=dtype)
    video = torch.empty(1, c.temporal_compression, 3, c.height, c.width, device="meta", dtype=dtype)
    t = torch.zeros(1, device="meta", dtype=dtype)
    action = torch.zeros(1, device="meta", dtype=torch.long)

    def params(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    def write_pass() -> None:
        cache.begin_write(cache.current_frame)
        pipe.dit(latent, t, action, cache, output=False)
        cache.end_write()  # the window stays full: the next count sees the same shapes

    kv_read = c.kv_cache_bytes()  # the full window, K and V, every block, each pass
    kv_write = c.kv_cache_bytes() // c.context_frames
    dit_w = params(pipe.dit) * WEIGHT_BYTES
    phases = {
        "encode (per session)": (_flops(lambda: pipe.vae.encoder(video)), params(pipe.vae.encoder) * WEIGHT_BYTES, 0),
        "DiT denoise pass": (_flops(lambda: pipe.dit(latent, t, action, cache)), dit_w, kv_read),
        "DiT cache-write pass": (_flops(write_pass), dit_w - params(pipe.dit.final) * WEIGHT_BYTES,
                                 kv_read + kv_write),
        "decode": (_flops(lambda: pipe.vae.decoder(latent)), params(pipe.vae.decoder) * WEIGHT_BYTES, 0),
    }
    per_frame = {"DiT denoise pass": c.steps, "DiT cache-write pass": 1, "decode": 1}
    total = [sum(phases[k][i] * n for k, n in per_frame.items()) for i in range(3)]
    phases[f"per latent frame ({c.steps} steps + write + decode)"] = tuple(total)
    return {"config": name, "params": pipe.param_counts()["total"], "tokens_per_frame": c.tokens_per_frame,
            "phases": {k: {"flops": f, "weight_bytes": w, "kv_bytes": kv} for k, (f, w, kv) in phases.items()}}


def roofline(flops: float, nbytes: float, device: DevicePeak) -> dict:
    compute_ms = flops / device.matmul_flops_per_s * 1e3
    memory_ms = nbytes / device.memory_bytes_per_s * 1e3
    floor_ms = max(compute_ms, memory_ms)
    return {"compute_ms": compute_ms, "memory_ms": memory_ms, "floor_ms": floor_ms,
            "bound": "FLOP" if compute_ms >= memory_ms else "bandwidth",
            "ridge_flop_per_byte": device.matmul_flops_per_s / device.memory_bytes_per_s,
            "max_latent_fps": 1e3 / floor_ms}


# --- report ------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60, help="timed latent frames for tiny (default 60)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed frames after the cache is full")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="intra-op threads (default cores-1, leaving one for a copy engine)")
    parser.add_argument("--skip-measure", action="store_true", help="only count the large presets")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    result: dict = {"devices": {k: vars(v) for k, v in DEVICES.items()}}

    if not args.skip_measure:
        tiny = measure_tiny(args.frames, args.warmup)
        result["tiny"] = tiny
        table = Table(title=f"tiny on this CPU ({tiny['threads']} thread(s), {tiny['steps']} steps)")
        for col in ("latent fps", "video fps", "ms/frame", "start ms", "DiT step ms", "write ms", "decode ms"):
            table.add_column(col, justify="right")
        table.add_row(*(f"{tiny[k]:.1f}" if k.endswith("fps") else f"{tiny[k]:.2f}" for k in
                        ("latent_fps", "video_fps", "frame_ms", "start_ms", "dit_step_ms", "cache_write_ms",
                         "decode_ms")))
        console.print(table)
        console.print("start = encode + anchor cache write (once per session); write = the t=0 cache-write "
                      "pass (once per frame)", style="dim")

    result["presets"] = {}
    for name in ("lucid-500m", "lucid-800m"):
        counted = count_frame(name)
        table = Table(title=f"{name}: {counted['params'] / 1e6:.1f}M params, {counted['tokens_per_frame']} "
                            f"tokens/frame, bf16 weights and KV")
        for col in ("phase", "GFLOP", "weights MB", "KV MB", "FLOP/byte"):
            table.add_column(col, justify="left" if col == "phase" else "right")
        for phase, v in counted["phases"].items():
            nbytes = v["weight_bytes"] + v["kv_bytes"]
            v["flop_per_byte"] = v["flops"] / nbytes
            table.add_row(phase, f"{v['flops'] / 1e9:.1f}", f"{v['weight_bytes'] / 1e6:.0f}",
                          f"{v['kv_bytes'] / 1e6:.0f}", f"{v['flop_per_byte']:.0f}")
        console.print(table)
        frame = list(counted["phases"].values())[-1]
        counted["roofline"] = {}
        roof = Table(title=f"{name}: one latent frame at peak rates (a floor, not a prediction)")
        for col in ("device", "ridge FLOP/B", "compute ms", "memory ms", "bound", "max latent fps"):
            roof.add_column(col, justify="left" if col in ("device", "bound") else "right")
        for device_name, device in DEVICES.items():
            r = roofline(frame["flops"], frame["weight_bytes"] + frame["kv_bytes"], device)
            counted["roofline"][device_name] = r
            roof.add_row(device_name, f"{r['ridge_flop_per_byte']:.0f}", f"{r['compute_ms']:.2f}",
                         f"{r['memory_ms']:.2f}", r["bound"], f"{r['max_latent_fps']:.0f}")
        console.print(roof)
        result["presets"][name] = counted

    console.print("peaks: " + "; ".join(f"{k}: {v.source}" for k, v in DEVICES.items()), style="dim")
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
