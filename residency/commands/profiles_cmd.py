"""`residency profiles`: list the shipped device profiles with their headline numbers.

Each is a datasheet profile until someone measures the card with `residency profile`.
"""

from __future__ import annotations

import json
import sys

from rich.table import Table

from residency.commands.console import make_console
from residency.device import DeviceProfile, load_profile, shipped_profile_names
from residency.units import fmt_bytes

LINK_AT_BYTES = 64 * 2**20


def add_parser(sub) -> None:
    """Register `residency profiles [--json]` on the subparsers `sub`."""
    p = sub.add_parser("profiles", help="list the shipped device profiles (use a NAME with --profile)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
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


def run(args) -> int:
    """Print the shipped device profiles as a table or JSON; returns 0."""
    rows = [summary(name, load_profile(name)) for name in shipped_profile_names()]
    if args.json:
        json.dump({"profiles": rows}, sys.stdout, indent=2)
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
    make_console().print(table)
    return 0
