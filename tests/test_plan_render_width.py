"""`residency plan`'s tables keep every figure whole at any console width: a long block name folds onto more
lines instead of squeezing the numeric columns to nothing."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

import residency.commands.plan_cmd as plan_cmd
from residency.cli import main
from residency.commands.plan_render import render_comparison, render_plan

FIGURE = re.compile(r"^(—|\d+\.\d+( [KMG]i?B)?|\d+%|outside|\(copy\))$")  # (copy): dequantized on the copy engine
WIDE = 400  # wide enough for every name on one line: the reference rendering


@pytest.fixture(scope="module")
def flux_schnell():
    """The flux-schnell plan `plan --policy all` renders, captured once (planning takes seconds)."""
    seen = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan_cmd, "render_plan", lambda _c, *args: seen.setdefault("plan", args))
        mp.setattr(plan_cmd, "render_comparison", lambda _c, *args: seen.setdefault("all", args))
        code = main(["plan", "flux-schnell", "--profile", "rx-7800-xt", "--frame-ms", "9300", "--policy", "all"])
    assert code in (0, 3)
    return seen


def rendered(width: int, render, args) -> list[str]:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    render(console, *args)
    return console.file.getvalue().splitlines()


def rows(lines: list[str], columns: int, first_figure: int = 1) -> list[list[str]]:
    """The cells of each table line with `columns` cells and a figure in column `first_figure`: a row's first
    line (a name or word folded onto more lines leaves the figure cells of the next ones empty)."""
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    return [c for c in cells if len(c) == columns and c[first_figure]]


def test_a_row_of_the_flux_schnell_plan_keeps_its_numbers_whole_at_100_columns(flux_schnell):
    wide = rows(rendered(WIDE, render_plan, flux_schnell["plan"]), 7)
    narrow = rendered(100, render_plan, flux_schnell["plan"])
    assert max(len(line) for line in narrow) <= 100
    expected = next(r for r in wide if r[0].startswith("transformer.transformer_blocks."))
    line = next(line for line in narrow if "transformer.transformer_blocks." in line)
    cells = [c.strip() for c in line.split("│")[1:-1]]
    assert cells[1:] == expected[1:]  # placement, format, MB, copy, dequant, compute: each printed whole
    assert all(FIGURE.match(c) for c in cells[3:]), cells


TABLES = (("plan", render_plan, 7, slice(3, 7)),  # blocks, placement, format | MB, copy, dequant, compute
          ("plan", render_plan, 3, slice(1, 3)),  # device memory: kind | bytes, share of the budget
          ("all", render_comparison, 7, slice(1, 6)))  # policy | ms/frame, fps, peak VRAM, link MB, quality | verdict


@pytest.mark.parametrize("width", [80, 100, 120, 160, 200])
def test_every_figure_of_every_table_is_printed_whole(flux_schnell, width):
    for key, render, columns, numeric in TABLES:
        wide, narrow = rendered(WIDE, render, flux_schnell[key]), rendered(width, render, flux_schnell[key])
        shown = [row[numeric] for row in rows(narrow, columns, numeric.start)]
        assert shown == [row[numeric] for row in rows(wide, columns, numeric.start)] != []
        assert all(FIGURE.match(c) for row in shown for c in row), shown
        assert max(len(line) for line in narrow if line[:1] in "┏┃┡│└") <= width


def test_a_long_block_name_breaks_after_a_dot_not_mid_word(flux_schnell):
    from residency.commands.plan_render import _wrapped_name

    assert _wrapped_name("vae.encoder.blocks.0", 14) == "vae.encoder.\nblocks.0"
    assert _wrapped_name("dit.blocks.0–3 (×4)", 40) == "dit.blocks.0–3 (×4)"
    assert _wrapped_name("a_very_long_single_part", 8) == "a_very_long_single_part"  # left to rich's fold
    # at 80 columns the CLIP encoder's table (room for every figure) breaks its names after "text_encoder."
    lines = rendered(80, render_plan, flux_schnell["plan"])
    table = lines[lines.index(next(x for x in lines if x.startswith("text_encoder —"))):]
    firsts = [line.split("│")[1].strip() for line in table[: table.index(next(x for x in table if x.startswith("└")))]
              if line.startswith("│")]
    assert "text_encoder." in firsts and not any(f.startswith("text_encod") and f != "text_encoder." for f in firsts)
