"""Ctrl-C at any point of a command, its start included, is one line and exit 130, never a traceback."""

from __future__ import annotations

import sys
import types

import residency.cli
from residency import entry


class _Interrupted(types.ModuleType):
    def __getattr__(self, name: str):
        raise KeyboardInterrupt


def test_ctrl_c_while_the_cli_imports_exits_130_with_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "residency.cli", _Interrupted("residency.cli"))
    assert entry.main() == entry.INTERRUPTED
    assert capsys.readouterr().err == "error: interrupted\n"


def test_ctrl_c_while_the_arguments_are_read_exits_130(monkeypatch, capsys):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(residency.cli, "build_parser", interrupted)
    assert residency.cli.main(["plan", "tiny"]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_the_entry_point_runs_the_cli(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["residency", "plan", "no-such-model-anywhere"])
    assert entry.main() == 2  # an unknown model is a usage error
    assert capsys.readouterr().err.startswith("error: ")


def test_ctrl_c_during_a_json_command_still_writes_one_error_document(monkeypatch, capsys):
    import json

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(residency.cli, "check_outputs_apart", interrupted)
    assert residency.cli.main(["plan", "tiny", "--json"]) == 130
    out = capsys.readouterr()
    assert json.loads(out.out) == {"error": "interrupted", "hint": None, "exit_code": 130}
    assert out.err == "error: interrupted\n"
