"""Benchmark: `compiled` DiT blocks (torch.compile) against eager ones, under the runtime on this CPU.

For tiny and the shipped model ("default"), resident and streamed plans (tools/bench_runtime.py's _plan: the
DiT blocks stream, the small blocks around them stay resident), eager and compiled: the runtime attached,
streamed weights rebound into their slots before every call. Per run: 3 warm-up frames, then 20 timed;
ms per latent frame (median of the timed frames), the warm-up's seconds beyond the eager run's (the
compiles), dynamo's compiled graphs and how many were compiled after the warm-up (the KV window fills for
context_frames frames: each new fill shape compiles once, then none), and the largest |latent - eager|.
A human table, then one JSON line last. `--backend` names the torch.compile backend (default inductor).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from pipelines.world_model import WorldModelPipeline  # noqa: E402
from pipelines.world_model.workload import catalog_entry  # noqa: E402
from residency.runtime import Runtime  # noqa: E402
from residency.runtime.compiled import COMPILE_BACKEND_ENV  # noqa: E402
from residency.session_setup import fallback_image, load_model  # noqa: E402
from residency.workload import workload_from_dict  # noqa: E402
from tools.bench_runtime import _plan  # noqa: E402

ACTIONS = ("up", "left", "idle", "jump", "right", "down")


def _models(names: list[str]) -> dict[str, tuple]:
    """name -> (pipeline in F32, its workload, a start image)."""
    out = {}
    for name in names:
        if name == "tiny":
            pipe = WorldModelPipeline.from_config("tiny")
            c = pipe.config
            out[name] = (pipe, workload_from_dict(catalog_entry("tiny")), fallback_image(c.height, c.width))
        else:
            m = load_model(name)
            c = m.pipe.config
            image = m.start_image if m.start_image is not None else fallback_image(c.height, c.width)
            out[name] = (m.pipe, m.workload, image)
    return out


def _with_mode(plan, mode: str):
    """The plan with every DiT block's exec_mode set to `mode`."""
    blocks = tuple(replace(bp, exec_mode=mode) if bp.name.startswith("dit.blocks.") else bp for bp in plan.blocks)
    return replace(plan, blocks=blocks)


def run(pipe, workload, image, plan, warmup: int, frames: int) -> dict:
    """One attached run: warm-up seconds, ms per timed frame (median), graphs compiled and latents."""
    torch._dynamo.reset()
    counters.clear()
    rt = Runtime(plan, "cpu", workload=workload).attach(pipe)
    try:
        session = pipe.start(image, seed=1)
        latents, times_ms, graphs = [], [], []
        t0 = time.perf_counter()
        for i in range(warmup + frames):
            t = time.perf_counter()
            rt.step(session, ACTIONS[i % len(ACTIONS)])
            times_ms.append((time.perf_counter() - t) * 1e3)
            latents.append(session.last_latent.clone())
            graphs.append(counters["stats"]["unique_graphs"])
            if i == warmup - 1:
                warm_s = time.perf_counter() - t0
        notes = list(rt.notes)
    finally:
        rt.detach()
    after = [i + 1 for i in range(warmup, warmup + frames) if graphs[i] > graphs[i - 1]]
    return {"warmup_s": warm_s, "ms_per_frame": statistics.median(times_ms[warmup:]), "graphs": graphs[-1],
            "recompiles_after_warmup": graphs[-1] - graphs[warmup - 1], "recompile_frames": after,
            "latents": latents, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table and the JSON line. Returns the exit code (0)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,default", help="comma-separated: tiny, default")
    ap.add_argument("--plans", default="resident,streamed", help="comma-separated: resident, streamed")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled runs")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up frames (not timed)")
    ap.add_argument("--frames", type=int, default=20, help="timed frames")
    args = ap.parse_args(argv)
    os.environ[COMPILE_BACKEND_ENV] = args.backend
    torch.set_grad_enabled(False)
    rows = []
    for name, (pipe, workload, image) in _models(args.models.split(",")).items():
        for placement in args.plans.split(","):
            base = _plan(workload, placement)
            eager = run(pipe, workload, image, _with_mode(base, "eager"), args.warmup, args.frames)
            t = time.perf_counter()
            comp = run(pipe, workload, image, _with_mode(base, "compiled"), args.warmup, args.frames)
            diff = max(float((a - b).abs().max()) for a, b in zip(comp["latents"], eager["latents"], strict=True))
            rows.append({
                "model": name, "plan": placement, "backend": args.backend,
                "eager_ms": round(eager["ms_per_frame"], 2), "compiled_ms": round(comp["ms_per_frame"], 2),
                "speedup": round(eager["ms_per_frame"] / comp["ms_per_frame"], 3),
                "compile_s": round(comp["warmup_s"] - eager["warmup_s"], 2),
                "graphs": comp["graphs"], "recompiles_after_warmup": comp["recompiles_after_warmup"],
                "recompile_frames": comp["recompile_frames"], "max_abs_diff": diff,
                "context_frames": pipe.config.context_frames, "run_s": round(time.perf_counter() - t, 1),
                "notes": comp["notes"],
            })
    table = Table(title=f"compiled ({args.backend}) vs eager DiT blocks, CPU runtime, "
                        f"{args.warmup} warm-up + {args.frames} frames")
    for col in ("model", "plan", "eager ms", "compiled ms", "speedup", "compile s", "graphs",
                "recompiles after warm-up (frames)", "max |Δ latent|"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["plan"], f"{r['eager_ms']:.2f}", f"{r['compiled_ms']:.2f}",
                      f"{r['speedup']:.2f}x", f"{r['compile_s']:.1f}", str(r["graphs"]),
                      f"{r['recompiles_after_warmup']} {r['recompile_frames']}", f"{r['max_abs_diff']:.2e}")
    Console().print(table)
    for r in rows:
        for note in r["notes"]:
            print(f"note ({r['model']}, {r['plan']}): {note}")
    print(json.dumps({"bench": "compile", "threads": torch.get_num_threads(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
