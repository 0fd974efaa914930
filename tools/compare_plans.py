"""Check that planning is unchanged between two revisions: the decisions of `residency plan` (placements, formats,
dtypes, lifetimes, execution, KV dtype, predicted ms to 0.1 µs) over the catalog × shipped profiles × {15, 60}
fps × {1 GiB, the profile's usable memory}, in this checkout and in a git revision (a temporary worktree).

    python tools/compare_plans.py REV [--models tiny,lucid-500m] [--profiles rtx-4090]

Prints the cases that differ, then one JSON line; exit 1 when any differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside a tree (its own residency): every case's decisions as one JSON document on stdout.
_CHILD = r"""
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
from residency import cli
cases = json.loads(sys.argv[2])
out = {}
for key, argv in cases:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(argv)
    if code != 0:
        out[key] = {"exit": code}
        continue
    doc = json.loads(buf.getvalue())
    plan = doc.get("plan", doc)
    blocks = [[b["name"], b["placement"], b["format"], b.get("compute_dtype"), b.get("lifetime"),
               b.get("dequant_on")] for b in plan["blocks"]]
    pred = plan.get("prediction") or {}
    out[key] = {"blocks": blocks, "execution": plan.get("execution"), "kv_dtype": plan.get("kv_dtype"),
                "frame_ms": round(pred.get("frame_ms", -1.0), 4), "peak": pred.get("peak_bytes")}
print(json.dumps(out))
"""


def cases(models: list[str], profiles: list[str]) -> list[tuple[str, list[str]]]:
    """(key, argv) of every case: model × profile × fps × VRAM."""
    out = []
    for m in models:
        for p in profiles:
            for fps in ("15", "60"):
                for vram in ("1GiB", None):
                    argv = ["plan", m, "--profile", p, "--fps", fps, "--json"] + (["--vram", vram] if vram else [])
                    out.append((f"{m} {p} {fps}fps {vram or 'usable'}", argv))
    return out


def decisions(tree: Path, todo: list[tuple[str, list[str]]]) -> dict:
    """Run every case with the residency of `tree` (a fresh interpreter)."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(tree), json.dumps(todo)], capture_output=True,
                          text=True, cwd=tree)
    if done.returncode:
        raise SystemExit(f"planning in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _differences(theirs: dict, ours: dict) -> list[str]:
    """The fields (and blocks) that differ between two cases' decisions, as lines."""
    lines = []
    for field in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(field), ours.get(field)
        if a == b:
            continue
        if field == "blocks" and a and b:
            lines += [f"block {x[0]}: {x[1:]} -> {y[1:]}" for x, y in zip(a, b, strict=False) if x != y]
        else:
            lines.append(f"{field}: {json.dumps(a)[:200]} -> {json.dumps(b)[:200]}")
    return lines


def main() -> int:
    """Compare this checkout's plans with revision REV's; returns 1 when any case differs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev", help="a git revision to compare with (e.g. HEAD~5)")
    p.add_argument("--models", help="comma-separated catalog models (default: the whole catalog)")
    p.add_argument("--profiles", help="comma-separated shipped profiles (default: all)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from pipelines.catalog import catalog_paths
    from residency.device import shipped_profile_names

    models = args.models.split(",") if args.models else sorted(catalog_paths())
    profiles = args.profiles.split(",") if args.profiles else list(shipped_profile_names())
    todo = cases(models, profiles)
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "rev"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), args.rev], check=True,
                       capture_output=True)
        try:
            theirs = decisions(other, todo)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], capture_output=True)
    ours = decisions(ROOT, todo)
    differ = sorted(k for k in ours if ours[k] != theirs.get(k))
    for k in differ:
        print(f"differs: {k}")
        for line in _differences(theirs.get(k) or {}, ours[k]):
            print(f"  {line}")
    print(json.dumps({"rev": args.rev, "cases": len(todo), "differ": len(differ), "differing": differ}))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
