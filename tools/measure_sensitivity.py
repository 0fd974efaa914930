"""Measure per-block precision sensitivity of the shipped world model, for the planner.

For each block of `pipe.blocks()` and each storage format, only that block's matrices hold the
values the format stores (round-trip through residency.formats, with the planner's fallback
rule); every other block stays at the shipped precision (BF16 weights, fp32 compute). The loss
is the MSE of the decoded rollout frames (pixels in [0, 1]) against the unmodified model's
rollout with the same start images, actions and noise — then scaled by one factor for all
blocks so that the mean over blocks at Q4_K equals the mean of the default proxy (relative
RMS weight error, residency.simulate.quality.block_error) at Q4_K. BF16 is 0: it is the
shipped precision. Written as {"loss": {block: {format: loss}}, ...} to sensitivity.json.

The KV cache is measured the same way, as one more row: every block's cache stored in each KV dtype, the weights as
shipped, against the shipped BF16 cache; scaled by the same factor, it is the planner's
loss["kv_cache"][kv_dtype] (residency.simulate.quality.kv_loss). fp32 holds every BF16 value: 0 by definition.

    .venv/bin/python tools/measure_sensitivity.py            # ~5-10 min on 2 cores
    .venv/bin/python tools/measure_sensitivity.py --kv-only  # the KV row alone, into the existing table (~1 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from pipelines.world_model.trained import DEFAULT_DIR, load_default, starts  # noqa: E402
from pipelines.world_model.trained.evaluate import mse, rollout, stored_as  # noqa: E402
from pipelines.world_model.trained.png import read_png  # noqa: E402
from pipelines.world_model.workload import catalog_entry  # noqa: E402
from residency.atomic_file import atomic_output  # noqa: E402
from residency.cli import report  # noqa: E402
from residency.errors import ResidencyError  # noqa: E402
from residency.simulate.quality import KV_SENSITIVITY_KEY as KV_KEY  # noqa: E402
from residency.simulate.quality import block_error  # noqa: E402
from residency.workload.catalog import workload_from_dict  # noqa: E402
from tools.game import new_game, policy  # noqa: E402

FORMATS = ("BF16", "FP8", "Q8_0", "Q6_K", "Q5_K", "Q4_K")
NORMALISE_FORMAT = "Q4_K"


def measure(pipe, cases: list[tuple[np.ndarray, list[int]]], formats: tuple[str, ...], console: Console) -> dict:
    reference = [rollout(pipe, image, actions) for image, actions in cases]
    raw: dict[str, dict[str, float]] = {}
    blocks = pipe.blocks()
    with Progress(console=console) as progress:
        task = progress.add_task("blocks x formats", total=len(blocks) * len(formats))
        for name, module, _ in blocks:
            raw[name] = {}
            for fmt in formats:
                with stored_as([module], fmt) as changed:
                    if changed == 0:  # the format stores this block's weights exactly
                        raw[name][fmt] = 0.0
                    else:
                        errs = [mse(rollout(pipe, image, actions), ref)
                                for (image, actions), ref in zip(cases, reference, strict=True)]
                        raw[name][fmt] = float(np.mean(errs))
                progress.update(task, advance=1)
    return raw


KV_DTYPES = ("bf16", "fp16", "fp8")  # the cache dtypes measured (fp32 holds every shipped BF16 value: 0)


def measure_kv(pipe, cases: list[tuple[np.ndarray, list[int]]], console: Console) -> dict[str, float]:
    """Rollout MSE with every block's KV cache stored in each KV_DTYPES dtype, against the pipeline's own cache
    dtype (the shipped BF16); fp32 is 0 (it holds every value the shipped cache does)."""
    shipped = pipe.config
    reference = [rollout(pipe, image, actions) for image, actions in cases]
    raw = {"fp32": 0.0}
    try:
        for kv in KV_DTYPES:
            if kv == shipped.kv_dtype:
                raw[kv] = 0.0
                continue
            pipe.config = dataclasses.replace(shipped, kv_dtype=kv)  # sessions build their cache from the config
            raw[kv] = float(np.mean([mse(rollout(pipe, image, actions), ref)
                                     for (image, actions), ref in zip(cases, reference, strict=True)]))
            console.print(f"KV cache as {kv}: rollout MSE {raw[kv]:.3g}")
    finally:
        pipe.config = shipped
    return raw


def _kv_only(pipe, cases, out: Path, console: Console) -> int:
    """Measure the KV row alone and write it into the existing table at its scale."""
    try:
        doc = json.loads(out.read_text())
        scale = float(doc["scale"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return report(ResidencyError(f"{out}: no measured table to add the KV row to ({err})",
                                     hint="run tools/measure_sensitivity.py without --kv-only first"))
    rollouts = {"starts": len(cases), "latent_frames": len(cases[0][1]) if cases else 0}
    if {k: doc.get("rollouts", {}).get(k) for k in rollouts} != rollouts:
        return report(ResidencyError(f"{out}: its table was measured on other rollouts ({doc.get('rollouts')}) than "
                                     f"these ({rollouts}): its scale would not hold for the KV row",
                                     hint="give --starts and --frames as the table was measured, or measure it all"))
    raw = measure_kv(pipe, cases, console)
    doc["loss"][KV_KEY] = {kv: v * scale for kv, v in raw.items()}
    doc["raw_mse"][KV_KEY] = raw
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"wrote the {KV_KEY} row of {out}: " + ", ".join(f"{k} {v * scale:.4f}" for k, v in raw.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_DIR, help="trained model directory")
    parser.add_argument("--out", type=Path, default=None, help="default: sensitivity.json in --model")
    parser.add_argument("--starts", type=int, default=4, help="held-out start images to roll out from")
    parser.add_argument("--frames", type=int, default=8, help="latent frames per rollout")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the table as one JSON line last")
    parser.add_argument("--kv-only", action="store_true", help="measure the KV cache's row alone and add it to "
                        "the existing table (at its scale)")
    args = parser.parse_args(argv)
    console = Console(stderr=args.json)
    torch.set_num_threads(args.threads)

    out = args.out or args.model / "sensitivity.json"
    try:
        pipe = load_default(directory=args.model)
    except ResidencyError as err:  # e.g. a directory without a trained model
        return report(err)
    cases = []
    for s in starts(args.model)[: args.starts]:
        seed = s["game_seed"]
        actions = list(policy(seed, args.frames, new_game(seed)))
        cases.append((read_png(args.model / s["file"]), actions))
    if args.kv_only:
        return _kv_only(pipe, cases, out, console)
    t0 = time.perf_counter()
    raw = measure(pipe, cases, FORMATS, console)
    kv_raw = measure_kv(pipe, cases, console)
    seconds = time.perf_counter() - t0

    workload = workload_from_dict(catalog_entry(pipe.config))
    proxy = {b: {f: block_error(workload, b, f) for f in FORMATS} for b in raw}
    mean_raw = float(np.mean([raw[b][NORMALISE_FORMAT] for b in raw]))
    mean_proxy = float(np.mean([proxy[b][NORMALISE_FORMAT] for b in raw]))
    scale = mean_proxy / mean_raw if mean_raw > 0 else 0.0
    loss = {b: {f: raw[b][f] * scale for f in FORMATS} for b in raw}
    loss[KV_KEY] = {kv: v * scale for kv, v in kv_raw.items()}
    raw[KV_KEY] = kv_raw
    doc = {
        "units": (f"rollout MSE vs the shipped model (pixels in [0,1]) x {scale:.6g}: the mean over blocks at "
                  f"{NORMALISE_FORMAT} equals the mean default proxy (relative RMS weight error) at {NORMALISE_FORMAT}"),
        "rollouts": {"starts": args.starts, "latent_frames": args.frames, "session_seed": 0},
        "scale": scale,
        "loss": loss,
        "raw_mse": raw,
        "proxy": proxy,
        "seconds": round(seconds, 1),
    }
    with atomic_output(out) as tmp:  # a kill mid-write leaves the previous table
        tmp.write_text(json.dumps(doc, indent=2) + "\n")

    table = Table(title=f"sensitivity (scaled loss; proxy mean at {NORMALISE_FORMAT} = {mean_proxy:.4f})")
    table.add_column("block")
    for f in FORMATS:
        table.add_column(f, justify="right")
    for b in raw:
        if b != KV_KEY:
            table.add_row(b, *(f"{loss[b][f]:.4f}" for f in FORMATS))
    console.print(table)
    console.print(f"{KV_KEY}: " + ", ".join(f"{kv} {v:.4f}" for kv, v in loss[KV_KEY].items()))
    console.print(f"wrote {out} in {seconds:.0f} s")
    if args.json:
        print(json.dumps(loss))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
