"""Write the model catalog (pipelines/catalog/*.json), or check that it equals a regeneration.

    python -m pipelines.catalog_build [NAMES…]          write the named entries (default: all)
    python -m pipelines.catalog_build --check [NAMES…]  exit 1 if a shipped entry differs from a regeneration
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time

from pipelines.catalog import catalog_dir
from pipelines.catalog_build import GENERATORS
from residency.atomic_file import atomic_output
from residency.errors import ResidencyError
from residency.workload import workload_from_dict


def render(doc: dict) -> str:
    """Stable text: one block per line keeps diffs of regenerated entries readable."""
    return json.dumps(doc, indent=1, sort_keys=False) + "\n"


def _first_difference(old: str, new: str) -> str:
    lines = list(difflib.unified_diff(old.splitlines(), new.splitlines(), "shipped", "regenerated", n=0,
                                      lineterm=""))
    return "\n".join(line[:200] for line in lines[:8])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.catalog_build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"entries (default: all of {', '.join(GENERATORS)})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a shipped entry differs")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in GENERATORS]
    if unknown:
        print(f"error: unknown catalog entries {unknown}", file=sys.stderr)
        print(f"hint: one of {', '.join(GENERATORS)}", file=sys.stderr)
        return 2
    stale = []
    for name in args.names or list(GENERATORS):
        start = time.perf_counter()
        try:
            doc = GENERATORS[name]()
            workload_from_dict(doc, name)  # validate before writing
        except ImportError as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            print('hint: the external models need the catalog extra: pip install -e ".[catalog]"', file=sys.stderr)
            return 2
        except ResidencyError as e:
            print(f"error: {e.message}", file=sys.stderr)
            return 2
        text = render(doc)
        path = catalog_dir() / f"{name}.json"
        took = time.perf_counter() - start
        if args.check:
            old = path.read_text(encoding="utf-8") if path.exists() else ""
            if old != text:
                stale.append(name)
                print(f"{name}: differs from a regeneration ({took:.1f} s)\n{_first_difference(old, text)}",
                      file=sys.stderr)
            else:
                print(f"{name}: up to date ({took:.1f} s)")
            continue
        with atomic_output(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({len(doc['blocks'])} blocks, {took:.1f} s)")
    if stale:
        print(f"error: stale catalog entries: {', '.join(stale)}", file=sys.stderr)
        print("hint: regenerate them: python -m pipelines.catalog_build " + " ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
