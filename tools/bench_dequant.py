"""Benchmark: dequant throughput of every storage format vs gguf's numpy reference.

Weights/s on a 4096×4096 matrix (best of eager and torch.compile, after warm-up), as a
fraction of this machine's memory-bound rate; a human table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np
import torch

from residency.formats import FORMATS, get_format, use_compiled
from residency.formats.compiled import compile_enabled, compile_failed

TARGETS = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")


def _time_ms(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def memcpy_gbps(nbytes: int = 256 * 2**20, repeats: int = 7) -> float:
    """Measured copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = _time_ms(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def gguf_reference(name: str, packed: torch.Tensor, rows: int):
    from gguf import GGMLQuantizationType
    from gguf import quants as gguf_quants

    fmt = FORMATS[name]
    if fmt.gguf_type is None:
        return None
    raw = packed.numpy().reshape(rows, -1)
    qtype = GGMLQuantizationType(fmt.gguf_type)
    return lambda: gguf_quants.dequantize(raw, qtype)


def bench_format(name: str, rows: int, cols: int, repeats: int, threads: int) -> dict:
    fmt = get_format(name)
    torch.manual_seed(0)
    w = torch.randn(rows, cols)
    if fmt.can_pack:
        packed = fmt.pack(w)
    else:  # dequant-only formats: random valid blocks (finite fp16 scales)
        raw = np.random.default_rng(0).integers(0, 256, size=(rows * cols // fmt.block_weights, fmt.block_bytes), dtype=np.uint8)
        scales = (np.random.default_rng(1).standard_normal((raw.shape[0], 2)) * 1e-2).astype(np.float16)
        raw[:, -4:] = scales.view(np.uint8)  # Q2_K/Q3_K keep d, dmin (or d) in their last bytes
        packed = torch.from_numpy(raw.reshape(-1))
    out = torch.empty(rows, cols, dtype=torch.float32)
    n = rows * cols
    result: dict = {"format": name, "bits_per_weight": round(8 * fmt.nbytes((rows, cols)) / n, 4)}

    torch.set_num_threads(threads)
    use_compiled(set())
    fmt.unpack(packed, out)
    eager_ms = _time_ms(lambda: fmt.unpack(packed, out), repeats)
    eager_out = out.clone()
    compiled_ms = math.inf
    exact_compiled = None
    if name not in ("F32",) and compile_enabled():  # RESIDENCY_COMPILE=0: eager only
        use_compiled({name})
        try:
            t0 = time.perf_counter()
            fmt.unpack(packed, out)
            result["compile_s"] = round(time.perf_counter() - t0, 2)
            fmt.unpack(packed, out)
            compiled_ms = _time_ms(lambda: fmt.unpack(packed, out), repeats)
            if compile_failed(fmt, out.dtype, out.device):  # it fell back to eager: nothing compiled to report
                compiled_ms = math.inf
            exact_compiled = bool(torch.equal(out.view(torch.int32), eager_out.view(torch.int32)))
        finally:
            use_compiled(set())
    ours_ms = min(eager_ms, compiled_ms)
    result.update(eager_ms=round(eager_ms, 3), compiled_ms=None if math.isinf(compiled_ms) else round(compiled_ms, 3))
    result["best"] = "compiled" if compiled_ms < eager_ms else "eager"
    result["ours_ms"] = round(ours_ms, 3)
    result["ours_weights_per_s"] = n / (ours_ms * 1e-3)
    result["compiled_equals_eager"] = exact_compiled

    ref = gguf_reference(name, packed, rows)
    if ref is not None:
        ref_out = ref()
        result["bit_exact_vs_gguf"] = bool(np.array_equal(eager_out.numpy().view(np.int32), ref_out.astype(np.float32).view(np.int32)))
        ref_ms = _time_ms(ref, max(2, repeats // 2))
        result["gguf_ms"] = round(ref_ms, 3)
        result["speedup_vs_gguf"] = ref_ms / ours_ms
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads (numpy uses 1)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated format names")
    args = ap.parse_args(argv)

    gbps = memcpy_gbps()
    rows = []
    for name in args.formats.split(","):
        r = bench_format(name.strip().upper(), args.rows, args.cols, args.repeats, args.threads)
        # Memory bound: each weight reads its packed bytes and writes 4 output bytes.
        bytes_per_weight = r["bits_per_weight"] / 8 + 4
        bound = gbps * 1e9 / bytes_per_weight
        r["memory_bound_weights_per_s"] = bound
        r["fraction_of_memory_bound"] = r["ours_weights_per_s"] / bound
        rows.append(r)
        print(f"  measured {r['format']}", file=sys.stderr)

    print(f"dequant {args.rows}×{args.cols} → fp32, torch threads={args.threads}, numpy 1 thread; memcpy {gbps:.1f} GB/s (read+write)")
    hdr = f"{'format':7} {'bits':>6} {'eager ms':>9} {'compiled':>9} {'best':>8} {'Gw/s':>6} {'gguf ms':>8} {'× gguf':>7} {'% mem-bound':>11} {'exact':>6}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        comp = f"{r['compiled_ms']:.1f}" if r["compiled_ms"] is not None else "—"
        gms = f"{r['gguf_ms']:.1f}" if "gguf_ms" in r else "—"
        sp = f"{r['speedup_vs_gguf']:.2f}" if "speedup_vs_gguf" in r else "—"
        ex = {True: "yes", False: "NO", None: "—"}[r.get("bit_exact_vs_gguf")]
        print(
            f"{r['format']:7} {r['bits_per_weight']:6.3f} {r['eager_ms']:9.1f} {comp:>9} {r['best']:>8} "
            f"{r['ours_weights_per_s'] / 1e9:6.2f} {gms:>8} {sp:>7} {100 * r['fraction_of_memory_bound']:10.1f}% {ex:>6}"
        )
    targets = [r for r in rows if r["format"] in TARGETS and "speedup_vs_gguf" in r]
    geo = math.exp(sum(math.log(r["speedup_vs_gguf"]) for r in targets) / len(targets)) if targets else None
    worst = min((r["speedup_vs_gguf"] for r in targets), default=None)
    exact = all(r.get("bit_exact_vs_gguf", True) for r in rows)
    if geo is not None:
        print(f"geomean speedup over {', '.join(r['format'] for r in targets)}: {geo:.2f}× (target ≥ 3×); worst {worst:.2f}× (target ≥ 1.5×); bit-exact: {exact}")
    summary = {
        "bench": "dequant",
        "shape": [args.rows, args.cols],
        "threads": args.threads,
        "memcpy_gbps": round(gbps, 2),
        "geomean_speedup_vs_gguf": None if geo is None else round(geo, 3),
        "worst_speedup_vs_gguf": None if worst is None else round(worst, 3),
        "bit_exact": exact,
        "formats": {r["format"]: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "format"} for r in rows},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
