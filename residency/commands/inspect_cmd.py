"""`residency inspect PATH|MODEL`: tensors grouped by block, bytes as stored and per format.

Like `accelerate estimate-memory`, but per block and per storage format.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from residency.commands.console import make_console
from residency.commands.sources import load_inventory
from residency.inventory import COMPARE_FORMATS, BlockInfo, Inventory
from residency.units import fmt_bytes, fmt_count


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's or built-in model's blocks and their sizes per format")
    p.add_argument("target", metavar="PATH|MODEL", help=".safetensors/.gguf file, a directory of shards, or a built-in model")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.set_defaults(run=run)


def _signature(b: BlockInfo) -> tuple:
    # Blocks with identical tensors (same suffixes, shapes, formats) collapse into one row.
    prefix = len(b.name) + 1
    return tuple((t.name[prefix:], t.shape, t.format) for t in b.tensors)


@dataclass
class _Row:
    label: str
    count: int
    block: BlockInfo


def _rows(blocks: list[BlockInfo]) -> list[_Row]:
    rows: list[_Row] = []
    for b in blocks:
        last = rows[-1] if rows else None
        head, _, idx = b.name.rpartition(".")
        if (
            last is not None
            and idx.isdigit()
            and last.block.name.rpartition(".")[0] == head
            and _signature(last.block) == _signature(b)
        ):
            last.count += 1
            first_idx = last.block.name.rpartition(".")[2]
            last.label = f"{head}.{first_idx}–{idx}"
            continue
        rows.append(_Row(b.name, 1, b))
    return rows


def _block_json(b: BlockInfo) -> dict:
    return {
        "name": b.name,
        "tensors": len(b.tensors),
        "params": b.params,
        "formats": b.formats,
        "stored_bytes": b.stored_bytes,
        "bytes_by_format": {f: b.bytes_as(f) for f in COMPARE_FORMATS},
    }


def to_json(inv: Inventory) -> dict:
    largest = inv.largest_block()
    return {
        "source": inv.source,
        "params": inv.params,
        "tensors": len(inv.tensors),
        "stored_bytes": inv.stored_bytes,
        "bytes_by_format": {f: inv.bytes_as(f) for f in COMPARE_FORMATS},
        "largest_block": _block_json(largest) if largest else None,
        "components": [
            {
                "name": c,
                "params": sum(b.params for b in inv.blocks_of(c)),
                "stored_bytes": sum(b.stored_bytes for b in inv.blocks_of(c)),
                "bytes_by_format": {f: sum(b.bytes_as(f) for b in inv.blocks_of(c)) for f in COMPARE_FORMATS},
                "blocks": [_block_json(b) for b in inv.blocks_of(c)],
            }
            for c in inv.components
        ],
    }


def render(inv: Inventory, console: Console) -> None:
    for component in inv.components:
        blocks = inv.blocks_of(component)
        table = Table(title=f"{component}  ({len(blocks)} blocks)", title_justify="left", show_footer=True)
        table.add_column("block", footer="total")
        table.add_column("tensors", justify="right", footer=str(sum(len(b.tensors) for b in blocks)))
        table.add_column("params", justify="right", footer=fmt_count(sum(b.params for b in blocks)))
        table.add_column("stored", justify="right", footer=fmt_bytes(sum(b.stored_bytes for b in blocks)))
        table.add_column("as", justify="left")
        for f in COMPARE_FORMATS:
            table.add_column(f, justify="right", footer=fmt_bytes(sum(b.bytes_as(f) for b in blocks)))
        for row in _rows(blocks):
            b = row.block
            each = " each" if row.count > 1 else ""
            label = f"{row.label} (×{row.count})" if row.count > 1 else row.label
            table.add_row(
                label,
                str(len(b.tensors)),
                fmt_count(b.params) + each,
                fmt_bytes(b.stored_bytes),
                "/".join(b.formats),
                *(fmt_bytes(b.bytes_as(f)) for f in COMPARE_FORMATS),
            )
        console.print(table)
    largest = inv.largest_block()
    console.print(
        f"[bold]{inv.source}[/bold]: {fmt_count(inv.params)} params in {len(inv.tensors)} tensors, "
        f"{len(inv.blocks)} blocks; stored {fmt_bytes(inv.stored_bytes)}; "
        + ", ".join(f"{f} {fmt_bytes(inv.bytes_as(f))}" for f in COMPARE_FORMATS)
    )
    if largest is not None:
        console.print(
            f"largest block: [bold]{largest.name}[/bold] {fmt_bytes(largest.stored_bytes)} as stored "
            f"({fmt_bytes(largest.bytes_as('Q4_K'))} at Q4_K) — the least that must fit on the device "
            "when everything else streams"
        )


def run(args) -> int:
    inv = load_inventory(args.target)
    if args.json:
        json.dump(to_json(inv), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(inv, make_console())
    return 0
