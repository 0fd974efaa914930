#!/usr/bin/env python3
"""Hostile inputs, each in its own process: mutated checkpoints, the CLI's bad-input matrix, 200,000 tensors.

    .venv/bin/python tools/bench_hostile.py [--seed 0] [--files 300] [--timeout-s 10]

Every case runs in a child forked from this interpreter (torch and residency already imported, so a
case costs its own work, not 2–4 s of start-up), killed at the deadline. Reported per group: tracebacks,
hangs, cases accepted that should be refused, wall time and the RSS the case added. Targets: ≤ 1 s and
≤ 300 MB per hostile file, `inspect` of 200,000 tensors ≤ 5 s, 0 tracebacks, 0 hangs.
A human table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from residency import cli  # noqa: E402
from residency.checkpoint import CheckpointError, open_checkpoint  # noqa: E402
from tools import hostile_cli_cases  # noqa: E402
from tools.case_runner import CaseResult, run_forked  # noqa: E402

FILE_WALL_S, FILE_RSS_BYTES, MANY_TENSORS_S = 1.0, 300 * 2**20, 5.0
MANY_TENSORS = 200_000


def read_everything(path: Path) -> str:
    """The library's promise: a checkpoint opens and every tensor reads, or CheckpointError — nothing else."""
    try:
        with open_checkpoint(path) as ck:
            for name in ck.entries:
                ck.read_packed(name)
                ck.read_tensor(name)
    except CheckpointError:
        return "refused"
    return "ok"


def cli_case(argv: list[str]):
    def case() -> str:
        code = cli.main(argv)
        return f"exit {code}"
    return case


def file_results(work: Path, seed: int, count: int, timeout_s: float) -> list[tuple[str, str, CaseResult]]:
    from tools.hostile_files import hostile_cases

    rows = []
    for name, suffix, data in hostile_cases(seed, count):
        path = work / f"hostile-{len(rows) // 2:04d}{suffix}"
        path.write_bytes(data)
        group = f"file{suffix}"
        rows.append((f"{group} library", name, run_forked(lambda p=path: read_everything(p), timeout_s)))
        rows.append((f"{group} inspect", name, run_forked(cli_case(["inspect", str(path)]), timeout_s)))
        path.unlink()
    return rows


def many_tensor_results(work: Path, timeout_s: float) -> list[tuple[str, str, CaseResult]]:
    from tools.hostile_files import many_tensors_file

    rows = []
    for suffix in (".safetensors", ".gguf"):
        path = work / f"many{suffix}"
        path.write_bytes(many_tensors_file(MANY_TENSORS, suffix))
        for argv in (["inspect", str(path)], ["inspect", "--json", str(path)]):
            rows.append((f"many-tensors{suffix}", " ".join(argv[:-1]), run_forked(cli_case(argv), timeout_s)))
        path.unlink()
    return rows


def worst_header_results(work: Path, timeout_s: float) -> list[tuple[str, str, CaseResult]]:
    """The most a hostile header can cost: the caps' worth of valid entries, then a lie (reported, no target
    of its own: it costs what a genuine file of as many tensors does)."""
    from tools.hostile_files import worst_header_file

    rows = []
    for suffix in (".safetensors", ".gguf"):
        path = work / f"worst{suffix}"
        path.write_bytes(worst_header_file(suffix))
        rows.append((f"worst-header{suffix}", f"{path.stat().st_size >> 20} MiB",
                     run_forked(lambda p=path: read_everything(p), timeout_s)))
        path.unlink()
    return rows


def cli_results(work: Path, timeout_s: float) -> list[tuple[str, str, CaseResult]]:
    good = hostile_cli_cases.prepare(work / "cli")
    return [(group, name, run_forked(cli_case(argv), timeout_s))
            for group, name, argv in hostile_cli_cases.cases(work / "cli", good)]


def verdict(group: str, result: CaseResult) -> str:
    """What is wrong with one case's result, or '' when nothing is."""
    if result.outcome == "hang":
        return "hang"
    if result.traceback or result.outcome.startswith("crash"):
        return "traceback"
    if group.startswith("file") and group.endswith("library"):
        return "" if result.outcome in ("refused", "ok") else f"unexpected {result.outcome}"
    if group.startswith("worst-header"):
        return "" if result.outcome == "refused" else f"unexpected {result.outcome}"
    if group.startswith("many-tensors"):
        return "" if result.outcome == "exit 0" else f"unexpected {result.outcome}"
    if group.startswith("file"):  # inspect: a readable file may be shown (0), a broken one refused (1)
        return "" if result.outcome in ("exit 0", "exit 1") else f"unexpected {result.outcome}"
    if result.outcome == "exit 0":
        return "accepted"
    if result.outcome not in ("exit 1", "exit 2"):
        return f"unexpected {result.outcome}"
    if "error:" not in result.stderr:
        return "no error: line"
    return ""


def summarise(rows: list[tuple[str, str, CaseResult]]) -> dict[str, dict]:
    groups: dict[str, list[tuple[str, CaseResult]]] = defaultdict(list)
    for group, name, result in rows:
        groups[group].append((name, result))
    out = {}
    for group, items in groups.items():
        walls = [r.wall_s for _, r in items]
        problems = [(name, verdict(group, r)) for name, r in items]
        out[group] = {
            "cases": len(items),
            "tracebacks": sum(v == "traceback" for _, v in problems),
            "hangs": sum(v == "hang" for _, v in problems),
            "accepted": sum(v == "accepted" for _, v in problems),
            "other_problems": sum(bool(v) and v not in ("traceback", "hang", "accepted") for _, v in problems),
            "wall_median_s": statistics.median(walls),
            "wall_max_s": max(walls),
            "added_rss_max_mb": max(r.added_rss_bytes for _, r in items) / 2**20,
            "peak_rss_max_mb": max(r.peak_rss_bytes for _, r in items) / 2**20,
            "failures": [f"{name}: {v}" + (f" ({r.detail})" if r.detail else "")
                         for (name, v), (_, r) in zip(problems, items, strict=True) if v][:20],
        }
    return out


def targets(summary: dict[str, dict]) -> dict[str, bool]:
    files = [s for g, s in summary.items() if g.startswith("file")]  # worst-header: reported, not judged
    many = [s for g, s in summary.items() if g.startswith("many-tensors")]
    return {
        "no_tracebacks": all(s["tracebacks"] == 0 for s in summary.values()),
        "no_hangs": all(s["hangs"] == 0 for s in summary.values()),
        "no_bad_input_accepted": all(s["accepted"] == 0 for s in summary.values()),
        "file_wall_le_1s": all(s["wall_max_s"] <= FILE_WALL_S for s in files),
        "file_rss_le_300mb": all(s["added_rss_max_mb"] * 2**20 <= FILE_RSS_BYTES for s in files),
        "inspect_200k_le_5s": all(s["wall_max_s"] <= MANY_TENSORS_S for s in many),
    }


def print_table(summary: dict[str, dict], met: dict[str, bool]) -> None:
    head = f"{'group':34} {'cases':>5} {'trace':>5} {'hang':>4} {'accept':>6} {'other':>5} " \
           f"{'wall p50':>9} {'wall max':>9} {'+RSS max':>9}"
    print(head)
    print("-" * len(head))
    for group, s in sorted(summary.items()):
        print(f"{group:34} {s['cases']:5d} {s['tracebacks']:5d} {s['hangs']:4d} {s['accepted']:6d} "
              f"{s['other_problems']:5d} {s['wall_median_s'] * 1e3:7.0f}ms {s['wall_max_s'] * 1e3:7.0f}ms "
              f"{s['added_rss_max_mb']:7.0f}MB")
    for group, s in sorted(summary.items()):
        for failure in s["failures"]:
            print(f"  {group}: {failure}")
    print("targets: " + ", ".join(f"{k} {'✓' if v else '✗'}" for k, v in met.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--files", type=int, default=300, help="mutated checkpoint files (both kinds together)")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="a case still running then is a hang")
    parser.add_argument("--skip", choices=("files", "cli", "many"), action="append", default=[])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # forked children must not inherit a busy OpenMP pool
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        work = Path(tmp)
        os.environ["XDG_CACHE_HOME"] = str(work / "cache")  # never read or write the user's cached profile
        rows = []
        if "files" not in args.skip:
            rows += file_results(work, args.seed, args.files, args.timeout_s)
        if "many" not in args.skip:
            rows += many_tensor_results(work, max(args.timeout_s, 4 * MANY_TENSORS_S))
            rows += worst_header_results(work, max(args.timeout_s, 4 * MANY_TENSORS_S))
        if "cli" not in args.skip:
            rows += cli_results(work, args.timeout_s)
    summary = summarise(rows)
    met = targets(summary)
    print_table(summary, met)
    print(json.dumps({"bench": "hostile", "seed": args.seed, "cases": len(rows), "targets": met,
                      "groups": {g: {k: v for k, v in s.items() if k != "failures"} for g, s in summary.items()}}))
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
