"""`residency profiles`: list the shipped device profiles with their headline numbers, this machine's cached
profile (what `plan` and `run` use without --profile), then the calibrated profiles cached by
`residency run --calibrate` and the demo (`--remove-calibrated` deletes those).

Each shipped profile is a datasheet profile until someone measures the card with `residency profile`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from residency.commands.console import make_console
from residency.device import (
    DeviceProfile,
    list_calibrated,
    load_profile,
    remove_calibrated,
    shipped_profile_names,
)
from residency.device.auto_profile import cached_profile_path, device_kind
from residency.device.calibrated import base_changed, base_name, calibrated_dir
from residency.errors import ResidencyError
from residency.units import fmt_bytes

LINK_AT_BYTES = 64 * 2**20


def add_parser(sub) -> None:
    """Register `residency profiles [--json] [--remove-calibrated]` on the subparsers `sub`."""
    p = sub.add_parser("profiles", help="list the shipped device profiles (use a NAME with --profile) and the "
                       "cached calibrated ones")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.add_argument("--remove-calibrated", action="store_true", help="delete the cached calibrated profiles "
                   "(`--profile calibrated` then needs a new `run --calibrate`)")
    p.set_defaults(run=run)


def summary(name: str, profile: DeviceProfile) -> dict:
    """The profile's headline figures as a JSON-ready dict (bytes, GB/s at a 64 MiB transfer)."""
    return {
        "name": name,
        "device": profile.name,
        "backend": profile.backend,
        "memory_total_bytes": profile.memory_total_bytes,
        "memory_usable_bytes": profile.memory_usable_bytes,
        "link_h2d_pinned_gbps_at_64mib": profile.h2d_gbps(LINK_AT_BYTES, pinned=True),
        "device_memory_gbps": profile.device_memory_gbps,
        "provenance": sorted({p.kind for p in profile.provenance.values()}),
    }


def calibrated_summary(path: Path, profile: DeviceProfile) -> dict:
    """A cached calibrated profile as a JSON-ready dict: its base, the model and frames it was fitted on."""
    c = profile.calibration
    return {"base": base_name(profile), "model": c.model, "frames": c.frames, "date": c.date, "path": str(path),
            "base_fingerprint": c.base_fingerprint, "workload_fingerprint": c.workload_fingerprint,
            # true: its base (this machine's cached profile) was re-measured or edited since; the next use deletes it
            "base_changed": base_changed(profile)}


def run(args) -> int:
    """Print the shipped device profiles and the cached calibrated ones as tables or JSON, or with
    --remove-calibrated delete the calibrated ones and say how many; returns 0.

    Raises ResidencyError when a calibrated profile cannot be deleted."""
    if args.remove_calibrated:
        removed = remove_calibrated()
        message = f"removed {removed} calibrated profile{'s' if removed != 1 else ''} from {calibrated_dir()}"
        if args.json:
            json.dump({"removed_calibrated": removed}, sys.stdout)
            sys.stdout.write("\n")
        else:
            make_console().print(message, markup=False, highlight=False)
        return 0
    err = make_console(stderr=True)
    rows = _shipped_rows(lambda line: err.print(f"note: {line}", markup=False, highlight=False))
    calibrated = [calibrated_summary(path, p) for path, p in list_calibrated(
        lambda line: err.print(f"note: {line}", markup=False, highlight=False))]
    default = _default_fingerprint()
    for c in calibrated:  # the user knows the shipped model as `default`, not by its config's name
        if c["workload_fingerprint"] == default:
            c["model"] = f"default ({c['model']})"
    machine = machine_summary()
    if args.json:
        json.dump({"profiles": rows, "machine": machine, "calibrated": calibrated}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    table = Table(title="shipped device profiles (--profile NAME)", title_justify="left")
    table.add_column("name", no_wrap=True)
    for col, justify in (("device", "left"), ("memory", "right"), ("link h2d @ 64 MiB", "right"),
                         ("memory bw", "right"), ("backend", "left"), ("provenance", "left")):
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(r["name"], r["device"], fmt_bytes(r["memory_total_bytes"]),
                      f"{r['link_h2d_pinned_gbps_at_64mib']:.1f} GB/s", f"{r['device_memory_gbps']:.0f} GB/s",
                      r["backend"], "+".join(r["provenance"]))
    console = make_console()
    console.print(table)
    console.print(_machine_line(machine), markup=False, highlight=False)
    _print_calibrated(console, calibrated)
    return 0


def _shipped_rows(say) -> list[dict]:
    """The summary of each profile in the shipped folder; a file there that does not read as one (a plan written
    into the folder: `plan -o profiles/x.json` is allowed) is skipped, said through `say`, not the whole listing's
    failure (it exited 1 with no table)."""
    rows = []
    for name in shipped_profile_names():
        try:
            rows.append(summary(name, load_profile(name)))
        except ResidencyError as e:
            say(f"skipped {name}: {e.message}")
    return rows


def machine_summary() -> dict:
    """This machine's cached profile: its path and, when it reads, its summary; "error" when it does not."""
    path = cached_profile_path(device_kind())
    if not path.is_file():
        return {"path": str(path), "measured": False}
    try:
        profile = load_profile(path)
    except ResidencyError as e:  # listed all the same: `plan` without --profile measures it again
        return {"path": str(path), "measured": True, "error": e.message}
    return {"path": str(path), "measured": True, **summary("machine", profile), "date": profile.date}


def _machine_line(m: dict) -> str:
    """One line on this machine's profile (what plan and run use without --profile)."""
    if not m["measured"]:
        return (f"this machine: not measured yet (`residency plan`/`run` without --profile measure it once in quick "
                f"mode, ~30-60 s, into {m['path']})")
    if "error" in m:
        return f"this machine: {m['path']} does not read ({m['error']}); the next plan or run measures it again"
    return (f"this machine (what plan and run use without --profile): {m['device']}, measured {m['date']}, "
            f"{fmt_bytes(m['memory_usable_bytes'])} usable, {m['path']}")


def _default_fingerprint() -> str | None:
    """The workload fingerprint of `default` (the shipped model), or None when it cannot be built."""
    from residency.commands.sources import shipped_workload

    try:
        return shipped_workload().fingerprint()
    except Exception:  # a broken checkout must not stop the listing: the raw model name is shown
        return None


def _print_calibrated(console, calibrated: list[dict]) -> None:
    """The second table: cached calibrated profiles (or a line saying there are none)."""
    if not calibrated:
        console.print(f"no readable calibrated profiles in {calibrated_dir()} (`residency run default -o out.gif --frames 18 --calibrate` makes one)",
                      markup=False, highlight=False)
        return
    table = Table(title="calibrated profiles (--profile calibrated; remove with --remove-calibrated)",
                  title_justify="left")
    for col, justify in (("base", "left"), ("model", "left"), ("frames", "right"), ("date", "left"),
                         ("path", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for r in calibrated:
        date = r["date"] + (" (base changed since: discarded at its next use)" if r["base_changed"] else "")
        table.add_row(escape(r["base"]), escape(r["model"]), str(r["frames"]), date, escape(r["path"]))
    console.print(table)
