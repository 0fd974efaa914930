"""`residency inspect PATH|MODEL`: tensors grouped by block, bytes as stored and per format.

Like `accelerate estimate-memory`, but per block and per storage format.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from residency.checkpoint.checkpoint import gc_paused
from residency.commands import arg_types
from residency.commands.console import make_console
from residency.commands.sources import load_inventory
from residency.errors import ResidencyError
from residency.inventory import COMPARE_FORMATS, BlockInfo, Inventory
from residency.units import fmt_bytes, fmt_count, plural


def add_parser(sub) -> None:
    """Register `residency inspect PATH|MODEL [--json]` on the subparsers `sub`."""
    p = sub.add_parser("inspect", help="show a checkpoint's or built-in model's blocks and their sizes per format")
    p.add_argument("target", metavar="PATH|MODEL",
                   help=".safetensors/.gguf file, a directory of shards, default (the shipped world model), a built-in or "
                   "catalog model, a catalog "
                   ".json, or a diffusers/transformers model directory (config.json; weights not needed)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    arg_types.add_size_arguments(p, "the call a pipeline directory's modules are found by (default: its "
                                 "pipeline's, as `plan` takes them; tensors do not depend on it)")
    p.set_defaults(run=run)


# The table draws at most this many rows per component (rich costs ~2 ms a row); `--json` lists
# every block. Real models collapse to a few dozen rows (identical blocks share one).
MAX_TABLE_ROWS = 200
MAX_INDENTED_BLOCKS = 2000


@dataclass(frozen=True)
class _Sizes:
    """One block's numbers, computed once: the table, its footer and the JSON all read them."""

    tensors: int
    params: int
    stored_bytes: int
    formats: tuple[str, ...]
    bytes_by_format: dict[str, int]
    kept_bf16: frozenset[str] = frozenset()  # formats some of its matrices do not fit (their last dimension): BF16


def _kept_bf16(name: str, tensors) -> list:
    """The matrices among `tensors` that format `name` cannot hold (their last dimension is not a multiple of its
    block): they stay BF16 (formats.sizing)."""
    from residency.formats import get_format
    from residency.formats.sizing import effective_format

    fmt = get_format(name)
    return [t for t in tensors if len(t.shape) >= 2 and effective_format(fmt, t.shape) is not fmt]


def _sizes(b: BlockInfo) -> _Sizes:
    kept = frozenset(f for f in COMPARE_FORMATS if _kept_bf16(f, b.tensors))
    return _Sizes(
        len(b.tensors), b.params, b.stored_bytes, tuple(b.formats), b.bytes_by_format(COMPARE_FORMATS), kept
    )


def _signature(b: BlockInfo) -> tuple:
    # Blocks with identical tensors (same suffixes, shapes, formats) collapse into one row.
    prefix = len(b.name) + 1
    return tuple(sorted((t.name[prefix:], t.shape, t.format) for t in b.tensors))  # shards list them in file order


@dataclass
class _Row:
    label: str
    count: int
    block: BlockInfo


def _rows(blocks: list[BlockInfo]) -> list[_Row]:
    rows: list[_Row] = []
    last_signature = None
    for b in blocks:
        last = rows[-1] if rows else None
        head, _, idx = b.name.rpartition(".")
        signature = _signature(b)
        if (
            last is not None
            and idx.isdigit()
            and last.block.name.rpartition(".")[0] == head
            and last_signature == signature
        ):
            last.count += 1
            first_idx = last.block.name.rpartition(".")[2]
            last.label = f"{head}.{first_idx}–{idx}"
            continue
        rows.append(_Row(b.name, 1, b))
        last_signature = signature
    return rows


def _block_json(b: BlockInfo, sizes: _Sizes) -> dict:
    return {
        "name": b.name,
        "tensors": sizes.tensors,
        "params": sizes.params,
        "formats": list(sizes.formats),
        "stored_bytes": sizes.stored_bytes,
        "bytes_by_format": dict(sizes.bytes_by_format),
    }


def _sum(sizes: list[_Sizes], fmt: str) -> int:
    return sum(s.bytes_by_format[fmt] for s in sizes)


def to_json(inv: Inventory) -> dict:
    """The inventory as a JSON-ready dict: per component its params, stored bytes, bytes per format."""
    sizes = {id(b): _sizes(b) for b in inv.blocks}
    largest = inv.largest_block()
    components = []
    for c, blocks in inv.by_component().items():
        own = [sizes[id(b)] for b in blocks]
        components.append(
            {
                "name": c,
                "params": sum(s.params for s in own),
                "stored_bytes": sum(s.stored_bytes for s in own),
                "bytes_by_format": {f: _sum(own, f) for f in COMPARE_FORMATS},
                "blocks": [_block_json(b, sizes[id(b)]) for b in blocks],
            }
        )
    every = list(sizes.values())
    totals = {f: _sum(every, f) for f in COMPARE_FORMATS}
    return {
        "source": inv.source,
        "params": sum(s.params for s in every),
        "tensors": sum(s.tensors for s in every),
        "stored_bytes": sum(s.stored_bytes for s in every),
        "bytes_by_format": totals,
        "largest_block": _block_json(largest, sizes[id(largest)]) if largest else None,
        # what the text prints below its totals, in the same words (without its "note: ")
        "notes": [*([inv.note] if inv.note else []), *(n.removeprefix("note: ") for n in fallback_notes(inv, totals))],
        "components": components,
        # tensors of dtypes residency does not store (I64 position ids, BOOL masks, F64): in no block, no total
        "left_out": [{"name": n, "dtype": d, "shape": list(sh), "stored_bytes": b} for n, d, sh, b in inv.left_out],
    }


def _component_table(component: str, blocks: list[BlockInfo], sizes: dict[int, _Sizes], source: str) -> Table:
    own = [sizes[id(b)] for b in blocks]
    # Names come from the file: escaped, or a "[/x]" in one would be read as rich markup (and raise).
    table = Table(title=f"{escape(component)}  ({plural(len(blocks), 'block')})", title_justify="left", show_footer=True)
    # long module paths fold onto a second line: cut, 4 blocks read "GPT2LMHeadModel.transform…" alike
    table.add_column("block", footer="total", overflow="fold", min_width=12)
    table.add_column("tensors", justify="right", footer=str(sum(s.tensors for s in own)))
    table.add_column("params", justify="right", footer=fmt_count(sum(s.params for s in own)))
    table.add_column("stored", justify="right", footer=fmt_bytes(sum(s.stored_bytes for s in own)))
    table.add_column("as", justify="left")
    for f in COMPARE_FORMATS:
        table.add_column(f, justify="right", footer=fmt_bytes(_sum(own, f)))
    rows = _rows(blocks)
    for row in rows[:MAX_TABLE_ROWS]:
        b = sizes[id(row.block)]
        each = " each" if row.count > 1 else ""
        label = f"{row.label} (×{row.count})" if row.count > 1 else row.label
        table.add_row(
            escape(label),
            str(b.tensors),
            fmt_count(b.params) + each,
            fmt_bytes(b.stored_bytes),
            "/".join(b.formats),
            *(fmt_bytes(b.bytes_by_format[f]) + ("*" if f in b.kept_bf16 else "") for f in COMPARE_FORMATS),
        )
    shown = rows[:MAX_TABLE_ROWS]
    caption = [text for text, used in (
        ("(×N): N blocks alike, one row; its tensors, params and sizes are one block's, the total counts all",
         any(r.count > 1 for r in shown)),
        ("*: some of its matrices stay BF16 at that format (their last dimension is not a multiple of its block)",
         any(sizes[id(r.block)].kept_bf16 for r in shown))) if used]
    if caption:
        table.caption, table.caption_justify = "\n".join(caption), "left"
    if len(rows) > MAX_TABLE_ROWS:
        hidden = sum(r.count for r in rows[MAX_TABLE_ROWS:])
        table.add_row(
            f"… {len(rows) - MAX_TABLE_ROWS} more rows ({plural(hidden, 'block')}, in the totals below); "
            f"`residency inspect --json {escape(source)}` lists them all"
        )
    return table


def render(inv: Inventory, console: Console) -> None:
    """Print one table per component, then totals and the largest block, to `console`."""
    sizes = {id(b): _sizes(b) for b in inv.blocks}
    for component, blocks in inv.by_component().items():
        console.print(_component_table(component, blocks, sizes, inv.source))
    every = list(sizes.values())
    largest = inv.largest_block()
    params = sum(s.params for s in every)
    console.print(
        f"[bold]{escape(inv.source)}[/bold]: {fmt_count(params)} param{'' if params == 1 else 's'} in "
        f"{plural(sum(s.tensors for s in every), 'tensor')}, {plural(len(inv.blocks), 'block')}; stored "
        f"{fmt_bytes(sum(s.stored_bytes for s in every))}; "
        + ", ".join(f"{f} {fmt_bytes(_sum(every, f))}" for f in COMPARE_FORMATS)
    )
    if inv.note:
        console.print(f"note: {inv.note}", markup=False, highlight=False)
    for note in fallback_notes(inv, {f: _sum(every, f) for f in COMPARE_FORMATS}):
        console.print(note, markup=False, highlight=False)
    if inv.left_out:
        console.print(left_out_note(inv.left_out, sum(s.stored_bytes for s in every)), markup=False,
                      highlight=False)
    if largest is not None:
        top = sizes[id(largest)]
        console.print(
            f"largest block: [bold]{escape(largest.name)}[/bold] {fmt_bytes(top.stored_bytes)} as stored "
            f"({fmt_bytes(top.bytes_by_format['Q4_K'])} at Q4_K) — the least that must fit on the device "
            "when everything else streams"
        )


def left_out_note(left_out: list[tuple[str, str, tuple[int, ...], int]], stored_bytes: int) -> str:
    """One line on the tensors in no block: how many, of which dtypes, their bytes, the first few named; and
    when they outweigh the weights read, that the file is most likely quantized by another tool."""
    dtypes = sorted({d for _, d, _, _ in left_out})
    out_bytes = sum(b for *_, b in left_out)
    shown = ", ".join(f"{n} {d} {list(s)}" for n, d, s, _ in left_out[:3]) + (
        f" and {len(left_out) - 3} more" if len(left_out) > 3 else "")
    line = (f"left out: {plural(len(left_out), 'tensor')} of {', '.join(dtypes)} ({fmt_bytes(out_bytes)}), not "
            f"weights residency stores: {shown}")
    if out_bytes > stored_bytes and dtypes == ["F64"]:  # float64 weights: an export or training format
        line += (" — more bytes than the weights counted above: the model's weights are float64, which residency "
                 "does not store; convert them to F32, F16 or BF16 (the totals miss them)")
    elif out_bytes > stored_bytes:  # an I8/F8_E5M2/packed-U8 quantization: the totals above miss the model
        line += (" — more bytes than the weights counted above: the model's weights are most likely in a format of "
                 "another tool (int8, fp8 e5m2, bitsandbytes), which residency does not read; the totals miss them")
    return line


def fallback_notes(inv: Inventory, totals: dict[str, int]) -> list[str]:
    """Why a format with fewer bits comes out larger than one with more (Q6_K above Q8_0): its matrices whose
    last dimension is not a multiple of its block stay BF16 (formats.sizing). One line per such format."""
    from residency.formats import get_format

    notes = []
    for i, name in enumerate(COMPARE_FORMATS):
        above = [f for f in COMPARE_FORMATS[:i] if totals[f] < totals[name]]
        if not above:
            continue
        fmt = get_format(name)
        kept = _kept_bf16(name, [t for b in inv.blocks for t in b.tensors])
        if not kept:
            continue
        widths = sorted({t.shape[-1] for t in kept})
        shown = ", ".join(map(str, widths[:4])) + (" …" if len(widths) > 4 else "")
        notes.append(f"note: {name} is larger than {above[-1]} here: {len(kept)} matrices whose last dimension "
                     f"({shown}) is not a multiple of its {fmt.block_weights}-weight block stay BF16 "
                     f"({fmt_bytes(sum(t.params for t in kept) * 2)} of its {fmt_bytes(totals[name])})")
    return notes


def no_weights_error(inv: Inventory) -> ResidencyError:
    """The error for a target holding no weight residency stores: an empty file, or only integer/bool/fp8-e5m2
    tensors (nothing to size, plan or run: a table of zeros would read as success)."""
    hint = "check that the path names the model's weights (a .safetensors/.gguf file, or the directory of its shards)"
    if not inv.left_out:
        return ResidencyError(f"{inv.source}: holds no tensors", hint)
    dtypes = sorted({d for _, d, _, _ in inv.left_out})
    name, dtype, shape, _ = inv.left_out[0]
    return ResidencyError(
        f"{inv.source}: no weights residency stores, only {plural(len(inv.left_out), 'tensor')} of "
        f"{', '.join(dtypes)} ({fmt_bytes(sum(b for *_, b in inv.left_out))}; first: {name} {dtype} {list(shape)})",
        hint + "; residency reads F32/F16/BF16 and GGUF-quantized weights, not int8, fp8 e5m2 or bitsandbytes ones")


def run(args) -> int:
    """Print the inventory of `args.target` as tables or JSON; returns 0.

    Raises ResidencyError (from load_inventory) for a target it cannot read, or one that holds no weights.
    """
    with gc_paused():  # ~10 objects per tensor, none in a cycle: GC passes would only rescan them
        inv = load_inventory(args.target, arg_types.example_size(args))
        if not inv.blocks:
            raise no_weights_error(inv)
        if args.json:
            doc = to_json(inv)
            # json indents in pure Python (~20 µs a block); past a few thousand blocks, print compact (C speed).
            sys.stdout.write(json.dumps(doc, indent=2 if len(inv.blocks) <= MAX_INDENTED_BLOCKS else None))
            sys.stdout.write("\n")
        else:
            render(inv, make_console())
    return 0
