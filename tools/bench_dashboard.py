"""Benchmark: what the live dashboard costs a rollout — tiny on this CPU with and without it attached.

The dashboard renders to a terminal-sized in-memory console at its live refresh rate; a human table, then one
JSON line last. Target: the rollout slows by at most 3%.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.live import Live  # noqa: E402
from rich.table import Table  # noqa: E402

from pipelines.world_model import WorldModelPipeline  # noqa: E402
from pipelines.world_model.workload import catalog_entry  # noqa: E402
from residency.dashboard import Dashboard, DashboardContext  # noqa: E402
from residency.dashboard.dashboard import REFRESH_PER_S  # noqa: E402
from residency.plan import BlockPlan, Budget, Plan  # noqa: E402
from residency.runtime import Runtime  # noqa: E402
from residency.workload import workload_from_dict  # noqa: E402

TARGET_OVERHEAD = 0.03


def _plan(w) -> Plan:
    # The decoder and half the DiT streamed: the dashboard has copies, stalls and slots to draw.
    blocks = tuple(BlockPlan(b.name, "streamed" if i % 2 else "resident", "F32", "fp32")
                   for i, b in enumerate(w.blocks))
    return Plan(model=w.name, workload_fingerprint=w.fingerprint(), profile="cpu", profile_fingerprint="-",
                policy="bench", budget=Budget(2**31, 66.7), blocks=blocks, steps=w.steps,
                context_frames=w.context_frames)


def rollout_ms(runtime, pipe, image, frames: int, board: Dashboard | None) -> list[float]:
    session = pipe.start(image, seed=0)
    times = []
    for _ in range(frames):
        t = time.perf_counter()
        runtime.step(session, "right")
        if board is not None:
            board.update(runtime.telemetry())
        times.append((time.perf_counter() - t) * 1e3)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=40, help="latent frames per timed rollout")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds with and without the dashboard")
    args = parser.parse_args()
    w = workload_from_dict(catalog_entry("tiny"))
    pipe = WorldModelPipeline.from_config("tiny")
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    runtime = Runtime(_plan(w), "cpu", workload=w).attach(pipe)
    context = DashboardContext("tiny · bench", 2**31, 66.7, 1)
    screen = Console(file=io.StringIO(), force_terminal=True, color_system="truecolor", width=120, height=60)
    plain, shown, refreshes = [], [], 0
    try:
        rollout_ms(runtime, pipe, image, 4, None)  # warm-up
        for _ in range(args.rounds):  # alternate, so background load hits both sides alike
            plain += rollout_ms(runtime, pipe, image, args.frames, None)
            board = Dashboard(context)
            with Live(board, console=screen, refresh_per_second=REFRESH_PER_S) as live:
                t = time.perf_counter()
                shown += rollout_ms(runtime, pipe, image, args.frames, board)
                refreshes += round((time.perf_counter() - t) * REFRESH_PER_S)
                live.refresh()
    finally:
        runtime.detach()
    plain_ms, shown_ms = statistics.median(plain), statistics.median(shown)
    overhead = shown_ms / plain_ms - 1.0
    table = Table(title="live dashboard overhead on tiny (ms per latent frame, median)")
    for col in ("rollout", "ms/frame", "frames"):
        table.add_column(col, justify="left" if col == "rollout" else "right")
    table.add_row("without dashboard", f"{plain_ms:.2f}", str(len(plain)))
    table.add_row(f"with dashboard ({REFRESH_PER_S} refreshes/s)", f"{shown_ms:.2f}", str(len(shown)))
    table.add_row("overhead", f"{overhead:+.1%}", f"target ≤ {TARGET_OVERHEAD:.0%}")
    Console().print(table)
    print(json.dumps({"plain_ms": plain_ms, "dashboard_ms": shown_ms, "overhead": overhead,
                      "refresh_per_s": REFRESH_PER_S, "approx_refreshes": refreshes, "target": TARGET_OVERHEAD,
                      "pass": overhead <= TARGET_OVERHEAD}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
