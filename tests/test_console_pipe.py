"""Piped output (every test's: stdout is no terminal): tables at $COLUMNS, else 120 columns; prose lines whole.
Hard-wrapped at 120, `inspect` cut "107.6 KiB" into "107.6" and "KiB" on two lines, and $COLUMNS was ignored."""

from __future__ import annotations

from residency.cli import main
from residency.commands.console import PIPE_WIDTH, make_console


def test_piped_width_is_columns_when_set_else_the_default(monkeypatch):
    assert make_console().width == PIPE_WIDTH
    monkeypatch.setenv("COLUMNS", "200")
    assert make_console().width == make_console(stderr=True).width == 200
    monkeypatch.setenv("COLUMNS", "wide")  # not a number: the default
    assert make_console().width == PIPE_WIDTH


def test_a_long_line_of_prose_is_printed_whole_and_tables_keep_the_width(capsys):
    line = "note: " + "word " * 40 + "107.6 KiB at the end"
    make_console().print(line)
    assert capsys.readouterr().out == line + "\n"
    assert main(["plan", "lucid-500m", "--profile", "rx-7800-xt", "--exec-mode", "eager"]) == 0
    out = capsys.readouterr().out
    assert max(len(row) for row in out.splitlines() if row.startswith(("┃", "│"))) <= PIPE_WIDTH
    notes = [row for row in out.splitlines() if row.lstrip().startswith("note: no frame budget")]
    assert len(notes) == 1 and len(notes[0]) > PIPE_WIDTH and notes[0].endswith("that plan")  # one line, not cut


def test_a_console_too_narrow_for_the_block_columns_lists_each_row_whole(monkeypatch, capsys):
    # at 40 columns the block tables squeezed the names, placements and formats to nothing ("┃┃┃┃ size ┃ co… ┃")
    from pipelines.catalog import catalog_paths
    from residency.workload import load_workload_file

    monkeypatch.setenv("COLUMNS", "40")
    assert main(["plan", "tiny", "--profile", "rx-7800-xt", "--vram", "8MiB", "--exec-mode", "eager"]) in (0, 3)
    out = capsys.readouterr().out
    assert "┃┃" not in out and "││" not in out
    listed = [row for row in out.splitlines() if ": placement " in row]
    names = {b.name for b in load_workload_file(catalog_paths()["tiny"]).blocks}
    shown = {row.split(": placement ")[0] for row in listed}
    assert all(n in shown or any(n.rsplit(".", 1)[0] in s for s in shown) for n in names)
    assert all(", format " in row and ", compute " in row for row in listed)
    monkeypatch.setenv("COLUMNS", "120")  # wide enough: the tables, as before
    assert main(["plan", "tiny", "--profile", "rx-7800-xt", "--vram", "8MiB", "--exec-mode", "eager"]) in (0, 3)
    assert ": placement " not in capsys.readouterr().out
