"""Benchmark: dequant speed of every storage format into fp32 and into bf16, against gguf's numpy.

Each row: a 4096×4096 matrix unpacked eager (what the runtime runs: chunked through a caller-owned
staging buffer) with torch.compile beside it, median and IQR of ≥ 15 samples, their A/A (even against odd
samples), and the fraction of the memory-bound floor, (packed + output bytes) ÷ copy bandwidth measured at
the same thread count. Samples are taken round-robin: each round times one copy and one call of every row
(every format into fp32 and into bf16, the two in an order that flips every two rounds), so bf16 against fp32
compares calls of one moment from both cache states, and a few seconds of a slower VM land on a few samples of
every row, not on all of one row's (taken row after row, one such spell put a row's IQR at 30 % of its median);
the copy bandwidth is the median of its rounds.
A human table, then one JSON line last.
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
from residency.formats.compiled import SLOWER_MARGIN, compile_enabled, compile_failed, set_probe
from residency.formats.staging import new_staging, staging_bytes

TARGETS = ("Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K")
OUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIN_SPEEDUP_VS_GGUF = 3.0  # into bf16, every target
MIN_GEOMEAN_FLOOR_FRACTION = 0.15  # into bf16, geometric mean over the targets
MAX_IQR_FRACTION = 0.25  # of the median, every row


def _samples_ms(fn, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def _median_iqr(samples: list[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return statistics.median(samples), q3 - q1


def copy_sampler(nbytes: int = 256 * 2**20):
    """A no-argument call that times one copy of `nbytes` and returns its bandwidth in GB/s, counting bytes
    read plus bytes written, at the current torch thread count."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)

    def sample() -> float:
        t0 = time.perf_counter()
        dst.copy_(src)
        return 2 * nbytes / (time.perf_counter() - t0) / 1e9

    return sample


def packed_matrix(name: str, rows: int, cols: int) -> torch.Tensor:
    """A rows × cols matrix packed in format `name`, as flat uint8: seeded random weights packed, or for a
    dequant-only format seeded random blocks with small finite fp16 scales."""
    fmt = get_format(name)
    if fmt.can_pack:
        return fmt.pack(torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)))
    # dequant-only formats: random valid blocks (finite fp16 scales in the last bytes: d, dmin or d)
    raw = np.random.default_rng(0).integers(0, 256, size=(rows * cols // fmt.block_weights, fmt.block_bytes), dtype=np.uint8)
    scales = (np.random.default_rng(1).standard_normal((raw.shape[0], 2)) * 1e-2).astype(np.float16)
    raw[:, -4:] = scales.view(np.uint8)
    return torch.from_numpy(raw.reshape(-1))


def gguf_reference(name: str, packed: torch.Tensor, rows: int):
    """A no-argument call of gguf's numpy dequant of `packed` (rows of the matrix: `rows`), or None when the
    format has no GGUF type."""
    from gguf import GGMLQuantizationType
    from gguf import quants as gguf_quants

    fmt = FORMATS[name]
    if fmt.gguf_type is None:
        return None
    raw = packed.numpy().reshape(rows, -1)
    qtype = GGMLQuantizationType(fmt.gguf_type)
    return lambda: gguf_quants.dequantize(raw, qtype)


def eager_setup(name: str, packed: torch.Tensor, rows: int, cols: int,
                warmup: int = 3) -> dict[str, tuple[list[float], torch.Tensor, torch.Tensor]]:
    """For each OUT_DTYPES dtype, an output and a staging buffer of its own (the runtime's per-thread buffer),
    warmed up by `warmup` unpacks of `packed`: dtype name -> (samples ms, to fill; out; staging)."""
    fmt = get_format(name)
    use_compiled(set())
    setups = {}
    for dtype_name, dtype in OUT_DTYPES.items():
        out = torch.empty(rows, cols, dtype=dtype)
        staging = new_staging(staging_bytes("cpu", rows * cols, dtype), "cpu")
        for _ in range(warmup):
            fmt.unpack(packed, out, staging)
        setups[dtype_name] = ([], out, staging)
    return setups


def sample_round_robin(cases: dict[str, tuple[torch.Tensor, dict]], repeats: int, copy_gbps) -> list[float]:
    """`repeats` rounds, each one copy_gbps() sample and one timed eager unpack of every format (name ->
    (packed, eager_setup)) into every dtype; the unpack samples (ms) go to the setups' lists. Returns the
    copy bandwidth samples (GB/s)."""
    use_compiled(set())
    gbps = []
    for r in range(repeats):
        gbps.append(copy_gbps())
        for name, (packed, setups) in cases.items():
            fmt = get_format(name)
            # the dtypes' order flips every two rounds (the A/A's even and odd samples then hold both orders): each
            # call inherits the cache its predecessor left (an fp32 unpack writes 64 MiB, evicting the next call's
            # staging); fp32 always first favoured bf16 by 2-6 % on Q6_K here
            order = list(setups.values())
            for samples, out, staging in order if r // 2 % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                fmt.unpack(packed, out, staging)
                samples.append((time.perf_counter() - t0) * 1e3)
    return gbps


def _aa(samples: list[float]) -> float:
    """A/A: the median of the even-numbered samples against the odd-numbered ones, less 1 (the same call
    against itself: the noise to read a difference against)."""
    return statistics.median(samples[0::2]) / statistics.median(samples[1::2]) - 1


def bench_row(name: str, dtype_name: str, packed: torch.Tensor, rows: int, cols: int, repeats: int,
              compile_too: bool, reference: np.ndarray | None,
              eager: tuple[list[float], torch.Tensor, torch.Tensor]) -> dict:
    """One row: the eager samples (sample_round_robin) of `packed` into `dtype_name`, median, IQR and A/A (ms);
    with compile_too, torch.compile's time beside it (and its first call's compile_s).

    reference: gguf's dequantized values, to check the eager output bit for bit ("exact"); None: unchecked.
    """
    fmt, dtype = get_format(name), OUT_DTYPES[dtype_name]
    samples, out, staging = eager
    eager_ms, eager_iqr = _median_iqr(samples)
    row: dict = {"format": name, "dtype": dtype_name, "eager_ms": eager_ms, "eager_iqr_ms": eager_iqr,
                 "eager_aa": _aa(samples)}
    eager_out = out.clone()
    if reference is not None:
        expect = torch.from_numpy(reference.astype(np.float32, copy=False)).view(rows, cols).to(dtype)
        # fp32: gguf's bits; bf16: gguf's fp32 result rounded once (round to nearest even).
        row["exact"] = bool(torch.equal(eager_out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                        expect.view(torch.int16 if dtype != torch.float32 else torch.int32)))
    if compile_too and name not in ("F32", "F16", "BF16") and compile_enabled():
        use_compiled({name})
        probe_was = set_probe(False)  # time the compiled kernel itself, which the runtime's probe may drop
        try:
            t0 = time.perf_counter()
            fmt.unpack(packed, out, staging)
            row["compile_s"] = time.perf_counter() - t0
            samples = _samples_ms(lambda: fmt.unpack(packed, out, staging), repeats)
            if not compile_failed(fmt, dtype, out.device):  # else it fell back to eager: nothing to report
                row["compiled_ms"], row["compiled_iqr_ms"] = _median_iqr(samples)
                row["compiled_equals_eager"] = bool(torch.equal(out, eager_out))
                # slower than eager: the CPU probe (residency.formats.compiled) drops it and runs eager
                row["compiled_dropped"] = row["compiled_ms"] > SLOWER_MARGIN * eager_ms
        finally:
            set_probe(probe_was)
            use_compiled(set())
    return row


def _ms(v: float | None, iqr: float | None, dropped: bool = False) -> str:
    return "—" if v is None else f"{v:.1f}±{iqr:.1f}" + ("†" if dropped else "")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=15, help="timed samples per row (≥ 15 for the targets)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads (numpy uses 1)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated format names")
    ap.add_argument("--no-compile", action="store_true", help="eager only (compiling takes seconds per row)")
    return ap


def _prepare(name: str, args: argparse.Namespace) -> tuple[torch.Tensor, np.ndarray | None, tuple[float, float] | None, dict]:
    """A format's packed matrix, gguf's result and time for it (None where gguf does not read the format),
    and its warmed-up eager setups."""
    packed = packed_matrix(name, args.rows, args.cols)
    ref_fn = gguf_reference(name, packed, args.rows)
    reference, gguf = None, None
    if ref_fn is not None:
        reference = ref_fn()
        gguf = _median_iqr(_samples_ms(ref_fn, max(5, args.repeats // 3), warmup=1))
    return packed, reference, gguf, eager_setup(name, packed, args.rows, args.cols)


def _format_rows(name: str, args: argparse.Namespace, gbps: float, prepared: tuple) -> list[dict]:
    """The rows of one format, one per output dtype, from its sampled setups, each with its memory-bound
    floor (ms, at `gbps` GB/s of copy bandwidth) and, where gguf reads the format, gguf's time and the
    speedup over it."""
    packed, reference, gguf, eager = prepared
    rows = []
    for dtype_name, dtype in OUT_DTYPES.items():
        r = bench_row(name, dtype_name, packed, args.rows, args.cols, args.repeats, not args.no_compile, reference,
                      eager[dtype_name])
        floor_ms = (packed.numel() + args.rows * args.cols * dtype.itemsize) / (gbps * 1e9) * 1e3
        r.update(packed_bytes=packed.numel(), floor_ms=floor_ms, floor_fraction=floor_ms / r["eager_ms"])
        if gguf is not None:
            r["gguf_ms"], r["gguf_iqr_ms"] = gguf
            r["speedup_vs_gguf"] = r["gguf_ms"] / r["eager_ms"]
        rows.append(r)
        print(f"  measured {name} → {dtype_name}", file=sys.stderr)
    return rows


def _print_table(args: argparse.Namespace, gbps: float, rows: list[dict]) -> None:
    print(f"dequant {args.rows}×{args.cols}, torch threads={args.threads} (numpy 1 thread); "
          f"copy {gbps:.1f} GB/s (read+write, median of the rounds); ms = median±IQR of {args.repeats} rounds")
    hdr = (f"{'format':7} {'out':4} {'eager ms':>12} {'A/A':>6} {'compiled ms':>12} {'gguf ms':>12} {'× gguf':>7} "
           f"{'floor ms':>8} {'% floor':>7} {'exact':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        sp = f"{r['speedup_vs_gguf']:.2f}" if "speedup_vs_gguf" in r else "—"
        ex = {True: "yes", False: "NO", None: "—"}[r.get("exact")]
        print(f"{r['format']:7} {r['dtype']:4} {_ms(r['eager_ms'], r['eager_iqr_ms']):>12} {100 * r['eager_aa']:+5.1f}% "
              f"{_ms(r.get('compiled_ms'), r.get('compiled_iqr_ms'), r.get('compiled_dropped', False)):>12} {_ms(r.get('gguf_ms'), r.get('gguf_iqr_ms')):>12} "
              f"{sp:>7} {r['floor_ms']:8.2f} {100 * r['floor_fraction']:6.1f}% {ex:>6}")
    if any(r.get("compiled_dropped") for r in rows):
        print(f"† compiled slower than {SLOWER_MARGIN:.2f}× eager: the unpack's CPU probe drops it, so "
              "use_compiled() runs such a format eager")


def _target_checks(rows: list[dict]) -> dict[str, bool]:
    """The bf16 checks over the TARGETS formats measured in both dtypes (none: no checks); prints their line."""
    by = {(r["format"], r["dtype"]): r for r in rows}
    targets = [t for t in TARGETS if (t, "bf16") in by and (t, "fp32") in by]
    if not targets:
        return {}
    bf = [by[(t, "bf16")] for t in targets]
    geo = math.exp(statistics.fmean(math.log(r["floor_fraction"]) for r in bf))
    checks = {
        "bf16_at_least_as_fast_as_fp32": all(by[(t, "bf16")]["eager_ms"] <= by[(t, "fp32")]["eager_ms"] for t in targets),
        "bf16_speedup_vs_gguf": all(r["speedup_vs_gguf"] >= MIN_SPEEDUP_VS_GGUF for r in bf),
        "bf16_geomean_floor_fraction": geo >= MIN_GEOMEAN_FLOOR_FRACTION,
    }
    print(f"targets ({', '.join(targets)}), into bf16: geomean {100 * geo:.1f}% of the floor "
          f"(≥ {100 * MIN_GEOMEAN_FLOOR_FRACTION:.0f}%); worst × gguf "
          f"{min(r['speedup_vs_gguf'] for r in bf):.2f} (≥ {MIN_SPEEDUP_VS_GGUF:.0f})")
    return checks


def main(argv: list[str] | None = None) -> int:
    """Benches every format named by --formats (argv: the command-line arguments; None reads sys.argv),
    prints the table, the checks and one JSON summary line. Returns 0: a failed check is reported, not raised."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    names = list(dict.fromkeys(s.strip().upper() for s in args.formats.split(",")))
    # every format is held at once for the rounds: ~180 MiB each at 4096² (outputs, staging, gguf's result)
    prepared = {}
    for name in names:
        prepared[name] = _prepare(name, args)
        print(f"  prepared {name}", file=sys.stderr)
    copy_gbps = copy_sampler()
    for _ in range(3):
        copy_gbps()
    gbps_samples = sample_round_robin({n: (p[0], p[3]) for n, p in prepared.items()}, args.repeats, copy_gbps)
    gbps = statistics.median(gbps_samples)
    rows = [r for name in names for r in _format_rows(name, args, gbps, prepared[name])]
    _print_table(args, gbps, rows)
    checks = _target_checks(rows)
    checks["iqr_under_quarter_of_median"] = all(r["eager_iqr_ms"] < MAX_IQR_FRACTION * r["eager_ms"] for r in rows)
    checks["exact"] = all(r.get("exact", True) for r in rows)
    print("checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items()))
    summary = {
        "bench": "dequant",
        "shape": [args.rows, args.cols],
        "threads": args.threads,
        "copy_gbps": round(gbps, 2),
        "copy_gbps_iqr": round(_median_iqr(gbps_samples)[1], 2),
        "rounds": args.repeats,
        "checks": checks,
        "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
