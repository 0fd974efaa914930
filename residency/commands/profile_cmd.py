"""`residency profile`: measure this machine (a GPU, or the CPU backend) and write its DeviceProfile.

A progress bar on stderr while measuring, then a summary table, then the profile file, written atomically.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from residency import userpath
from residency.atomic_file import check_can_create
from residency.commands import arg_types
from residency.commands.console import make_console
from residency.device import DeviceProfile, default_device, measure_profile, profile_to_dict, save_profile
from residency.device.measure import check_measurable
from residency.errors import ResidencyError, UsageError
from residency.units import fmt_bytes, plural

SUMMARY_LINK_SIZES_BYTES = (64 * 2**10, 2**20, 64 * 2**20)


def add_parser(sub) -> None:
    """Register `residency profile [--device] [--quick] [-o PATH] [--json]` on `sub`."""
    p = sub.add_parser("profile", help="measure this machine's link, memory, matmul and dequant rates")
    p.add_argument("--device", type=arg_types.device, default=None,
                   help="cuda:N or cpu (default: cuda:0 if a GPU is visible, else cpu)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (under a minute on the CPU)")
    p.add_argument("-o", "--output", metavar="PATH", default=None,
                   help="where to write the profile JSON (default: ./profile-<device>.json)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON instead of the summary table")
    p.set_defaults(run=run)


def default_output(device: str) -> Path:
    """./profile-<device>.json, with the device name reduced to lowercase letters and digits."""
    return Path(f"profile-{re.sub(r'[^a-z0-9]+', '', device.lower())}.json")


def _check_output(path: str | Path) -> None:
    # Checked before measuring: a bad -o should not cost a minute of measurement.
    if str(path).endswith(("/", os.sep)):  # Path() would drop the slash: a file named after the directory
        raise ResidencyError(f"{str(path)[:200]}: ends with '/', a directory's name, and the profile is a file",
                             hint=f"name the file, e.g. -o {path}profile.json")
    path = Path(path)
    if userpath.path_kind(path)[0] == userpath.DIRECTORY:  # before the extension: "no extension" misled
        raise ResidencyError(f"{str(path)[:200]}: is a directory, and the profile is a file",
                             hint=f"name a file in it, e.g. -o {path / 'profile.json'}")
    if path.suffix.lower() != ".json":  # a usage mistake (exit 2), as run -o out.jpg is
        raise UsageError(f"{str(path)[:200]}: a profile is a JSON file, and the name ends in "
                             f"{path.suffix or 'no extension'}", hint="name it *.json, e.g. -o profile.json")
    parent = path.parent if str(path.parent) else Path(".")
    kind, reason = userpath.path_kind(path)
    if kind == userpath.BAD:
        raise ResidencyError(f"{str(path)[:200]}: cannot write the profile there ({reason})",
                             hint="give -o a shorter file name")
    if userpath.path_kind(parent)[0] != userpath.DIRECTORY:
        why, creatable = userpath.not_a_directory(parent)
        raise ResidencyError(f"{path}: {why}", hint="create it first, or give -o a path in an existing directory"
                             if creatable else "give -o a path in an existing directory")
    if kind == userpath.DIRECTORY:
        raise ResidencyError(f"{path}: is a directory", hint="give -o a file name, e.g. -o profile.json")
    check_can_create(path)  # a read-only filesystem fails now, not after a minute of measuring


def _pct(spread: float) -> str:
    return f"±{50 * spread:.0f}%"  # half the p10–p90 width, relative to the median


def fmt_elements(n: float) -> str:
    """An element count in binary k or M, e.g. "4 M"."""
    if n < 2**10:  # "0.5625 k" read oddly for a 576-weight kernel
        return f"{n:g}"
    return f"{n / 2**20:g} M" if n >= 2**20 else f"{n / 2**10:g} k"


def render(profile: DeviceProfile, console: Console) -> None:
    """Print the profile's measured figures (link, memory, matmul, attention, dequant, overlap, interference)
    as a table."""
    table = Table(title=f"{profile.name} ({profile.backend})", title_justify="left")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("p10–p90 / 2", justify="right")
    table.add_row("memory total / usable", f"{fmt_bytes(profile.memory_total_bytes)} / "
                  f"{fmt_bytes(profile.memory_usable_bytes)}", "")
    for direction in ("h2d_pinned", "h2d_pageable", "d2h_pinned"):
        curve = profile.link[direction]
        for n in SUMMARY_LINK_SIZES_BYTES:
            i = min(range(len(curve.x)), key=lambda j: abs(curve.x[j] - n))
            spread = _pct(curve.spread[i]) if curve.spread and curve.x[i] == n else ""
            table.add_row(f"link {direction} @ {fmt_bytes(n)}", f"{curve.at(n):.2f} GB/s", spread)
    table.add_row("device memory (read + write)", f"{profile.device_memory_gbps:.1f} GB/s", "")
    weights = [("", profile.matmul_tflops, profile.matmul_weight_dim),
               (", small weights", profile.matmul_small_tflops, profile.matmul_small_weight_dim)]
    for label, curves, dim in weights:
        for dtype, curve in curves.items():
            for i in sorted({0, len(curve.x) - 1}):
                spread = _pct(curve.spread[i]) if curve.spread else ""
                size = f", {dim}² weights" if dim and not label else f" ({dim}²)" if dim else ""
                table.add_row(f"matmul {dtype} @ {plural(int(curve.x[i]), 'row')}{label}{size}", f"{curve.y[i]:.3g} TFLOP/s",
                              spread)
    for dtype, curve in profile.attention_tflops.items():
        for i in sorted({0, len(curve.x) - 1}):
            table.add_row(f"attention {dtype} @ {int(curve.x[i])} query rows", f"{curve.y[i]:.3g} TFLOP/s", "")
    for dtype, curve in profile.conv_tflops.items():
        for i in sorted({0, len(curve.x) - 1}):
            table.add_row(f"conv {dtype} @ {fmt_elements(curve.x[i])}-weight kernel", f"{curve.y[i]:.3g} TFLOP/s", "")
    if profile.matmul_rewarm_us is not None:
        curve = profile.matmul_rewarm_us
        for i in sorted({0, len(curve.x) - 1}):
            table.add_row(f"cache re-warm after a matmul of {fmt_elements(curve.x[i])} weights",
                          f"{curve.y[i]:.3g} µs", "")
    for label, factor in (("copy slowdown while computing", profile.copy_slowdown),
                          ("compute slowdown while copying", profile.compute_slowdown)):
        if factor > 0:
            table.add_row(label, f"×{factor:.2f}", "")
    target = "fp32" if profile.backend == "cpu" else "bf16"  # what each backend's dequant writes
    for fmt, rate in profile.dequant_gweights_per_s.items():
        value = f"{rate:.3g} G weights/s"
        if profile.dequant_call_us.get(fmt):
            value += f" +{profile.dequant_call_us[fmt]:.3g} µs/call"
        spread = ""
        curve = profile.dequant_tensor_gweights_per_s.get(fmt)
        if curve is not None:
            # the planner prices each tensor by the curve: a middle sample first (a small model's tensor size, where
            # the cache makes it differ most from the large matrix's rate and call cost, which follow in brackets)
            mid = len(curve.x) // 2
            value = f"{curve.y[mid]:.3g} G weights/s @ {fmt_elements(curve.x[mid])}-weight tensor (large: {value})"
            spread = _pct(curve.spread[mid]) if curve.spread else ""
        if fmt in profile.dequant_fresh_factor:  # a streamed block's unpack, from the slot just filled
            value += f"; fresh slot ×{profile.dequant_fresh_factor[fmt]:.2f}"
        table.add_row(f"dequant {fmt} → {target}", value, spread)
    if profile.elementwise_gelems_per_s is not None:
        curve = profile.elementwise_gelems_per_s
        for i in sorted({0, len(curve.x) - 1}):
            table.add_row(f"elementwise ops @ {fmt_elements(curve.x[i])} a tensor", f"{curve.y[i]:.3g} G elements/s", "")
    table.add_row("copy/compute overlap", f"{profile.copy_compute_overlap:.2f}", "")
    table.add_row("per-op dispatch" if profile.backend == "cpu" else "launch overhead",
                  f"{profile.launch_overhead_us:.2f} µs", "")
    if profile.compute_threads:
        table.add_row("compute threads", str(profile.compute_threads), "")
    console.print(table)


def run(args) -> int:
    """Measure this machine and write the profile JSON; returns 0.

    Raises UsageError for an unknown device and ResidencyError for an unwritable -o path, both before
    measuring. Cost: minutes of measurement (--quick: under a minute on the CPU).
    """
    device = args.device or default_device()
    check_measurable(device)  # a GPU torch does not see: said before the progress display starts
    if args.output is not None and not args.output.strip():  # '' read as "no -o": the default file, silently
        raise UsageError("-o needs a file name, got an empty one", hint="e.g. -o my-gpu.json, or leave -o out")
    _check_output(args.output or default_output(device))
    output = Path(args.output) if args.output else default_output(device)
    source = f"residency profile --device {device}" + (" --quick" if args.quick else "")
    err = Console(stderr=True)
    started = time.perf_counter()
    with Progress(TextColumn("{task.description:<22}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(f"measuring {device}", total=None)

        def progress(label: str, done: int, total: int) -> None:
            bar.update(task, description=label, completed=done, total=total)

        profile = measure_profile(device, args.quick, progress, source)
    elapsed_s = time.perf_counter() - started
    path = save_profile(profile, output)
    if args.json:
        json.dump(profile_to_dict(profile), sys.stdout, indent=2)
        sys.stdout.write("\n")
        print(f"wrote {path} ({elapsed_s:.1f} s of measurement)", file=sys.stderr)
    else:
        console = make_console()
        render(profile, console)
        console.print(f"wrote [bold]{path}[/bold] ({elapsed_s:.1f} s of measurement); "
                      f"plan with --profile {path}")
    return 0
