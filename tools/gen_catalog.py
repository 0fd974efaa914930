"""Generate the model catalog (pipelines/catalog/*.json) from real architectures on the meta device.

World-model presets come from pipelines.world_model; external models from their reference code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.catalog import catalog_dir  # noqa: E402
from residency.atomic_file import atomic_output  # noqa: E402
from residency.workload import workload_from_dict  # noqa: E402
from tools.catalog_flux import catalog_entry as flux_catalog_entry  # noqa: E402
from tools.catalog_wan import catalog_entry as wan_catalog_entry  # noqa: E402


def _world_model(name: str) -> Callable[[], dict]:
    def build() -> dict:
        from pipelines.world_model.workload import catalog_entry

        return catalog_entry(name)

    return build


GENERATORS: dict[str, Callable[[], dict]] = {
    "tiny": _world_model("tiny"),
    "lucid-500m": _world_model("lucid-500m"),
    "lucid-800m": _world_model("lucid-800m"),
    # real third-party architectures: need the `catalog` extra (diffusers, transformers) when called
    "flux-schnell": flux_catalog_entry,
    "wan-causal-1.3b": wan_catalog_entry,
}


def render(doc: dict) -> str:
    """Stable text: one block per line keeps diffs of regenerated entries readable."""
    return json.dumps(doc, indent=1, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"entries to write (default: all of {', '.join(GENERATORS)})")
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed entry differs")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in GENERATORS]
    if unknown:
        print(f"error: unknown catalog entries {unknown}", file=sys.stderr)
        print(f"hint: one of {', '.join(GENERATORS)}", file=sys.stderr)
        return 2
    stale = []
    for name in args.names or list(GENERATORS):
        doc = GENERATORS[name]()
        workload_from_dict(doc, name)  # validate before writing
        text = render(doc)
        path = catalog_dir() / f"{name}.json"
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
            continue
        with atomic_output(path) as tmp:
            tmp.write_text(text)
        print(f"wrote {path} ({len(doc['blocks'])} blocks)")
    if stale:
        print(f"error: stale catalog entries: {', '.join(stale)}", file=sys.stderr)
        print("hint: run .venv/bin/python tools/gen_catalog.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
