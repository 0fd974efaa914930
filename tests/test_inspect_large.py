"""`residency inspect` of files with many blocks: the table summarises, `--json` stays complete.

Names come from the file, so they are printed as text (never as rich markup), and paths the OS
refuses or cannot read end in `error:`/`hint:`, never a traceback or a hang.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from residency.checkpoint import save_checkpoint
from residency.cli import main
from residency.commands import inspect_cmd
from tools.hostile_files import many_tensors_file


@pytest.fixture
def many_blocks(tmp_path):
    path = tmp_path / "many.gguf"
    path.write_bytes(many_tensors_file(4 * 30, "gguf"))  # 30 blocks, every one different
    return path


def test_table_stops_at_the_row_cap_and_says_how_to_see_the_rest(many_blocks, capsys, monkeypatch):
    monkeypatch.setattr(inspect_cmd, "MAX_TABLE_ROWS", 10)
    assert main(["inspect", str(many_blocks)]) == 0
    out = capsys.readouterr().out
    assert "blocks.9 " in out and "blocks.10 " not in out
    assert "20 more rows (20 blocks" in out
    assert "--json" in out
    assert "120 tensors, 30 blocks" in out  # totals still count every block


def test_json_lists_every_block_whatever_the_row_cap(many_blocks, capsys, monkeypatch):
    monkeypatch.setattr(inspect_cmd, "MAX_TABLE_ROWS", 10)
    assert main(["inspect", "--json", str(many_blocks)]) == 0
    doc = json.loads(capsys.readouterr().out)
    blocks = [b for c in doc["components"] for b in c["blocks"]]
    assert len(blocks) == 30 and doc["tensors"] == 120
    assert sum(b["tensors"] for b in blocks) == doc["tensors"]


def test_identical_blocks_still_collapse_into_one_row(tmp_path, capsys):
    tensors = {f"dit.blocks.{i}.w": torch.zeros(4, 32) for i in range(6)}
    path = save_checkpoint(tmp_path / "same.safetensors", tensors)
    assert main(["inspect", str(path)]) == 0
    assert "dit.blocks.0–5 (×6)" in capsys.readouterr().out


def test_json_totals_agree_with_the_blocks(tmp_path, capsys):
    tensors = {"a.blocks.0.w": torch.zeros(8, 64), "a.blocks.1.w": torch.zeros(2, 32), "b.norm": torch.zeros(7)}
    path = save_checkpoint(tmp_path / "m.safetensors", tensors, {"a.blocks.0.w": "Q8_0"})
    assert main(["inspect", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    blocks = [b for c in doc["components"] for b in c["blocks"]]
    for key in ("params", "stored_bytes"):
        assert doc[key] == sum(b[key] for b in blocks) == sum(c[key] for c in doc["components"])
    for fmt, total in doc["bytes_by_format"].items():
        assert total == sum(b["bytes_by_format"][fmt] for b in blocks)
    assert doc["stored_bytes"] == 8 * 64 // 32 * 34 + 2 * 32 * 4 + 7 * 4


def test_names_that_look_like_markup_are_printed_as_text(tmp_path, capsys):
    path = save_checkpoint(tmp_path / "m.safetensors", {"[/bold]x.[red]0.w": torch.zeros(2, 2)})
    assert main(["inspect", str(path)]) == 0
    assert "[/bold]x.[red]0" in capsys.readouterr().out


def test_an_overlong_path_is_an_error_not_a_traceback(tmp_path, capsys):
    rc = main(["inspect", str(tmp_path / ("n" * 300 + ".gguf"))])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "too long" in err and "hint: " in err


def test_a_fifo_is_refused_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    rc = main(["inspect", str(fifo)])  # opening it would block forever: it must never be opened
    err = capsys.readouterr().err
    assert rc == 1 and "not a regular file" in err and "hint: " in err


def test_a_k_quant_larger_than_q8_0_says_which_matrices_stay_bf16(tmp_path, capsys):
    path = tmp_path / "odd.safetensors"
    save_checkpoint(path, {f"blocks.{i}.w": torch.zeros(64, 1152) for i in range(3)}  # 1152 = 4.5 × 256
                    | {"blocks.0.v": torch.zeros(64, 1024)})
    assert main(["inspect", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "note: Q6_K is larger than Q8_0 here: 3 matrices whose last dimension (1152)" in out
    assert "note: Q4_K is larger than Q8_0 here: 3 matrices" in out
    assert main(["inspect", str(path), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert [n.split(" here")[0] for n in notes] == ["Q6_K is larger than Q8_0", "Q4_K is larger than Q8_0"]
    save_checkpoint(path, {"blocks.0.v": torch.zeros(64, 1024)})
    assert main(["inspect", str(path)]) == 0
    assert "stay BF16" not in capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []


@pytest.mark.parametrize("tensors, said", [
    ({}, "holds no tensors"),
    ({"pos": torch.arange(10), "mask": torch.ones(3, dtype=torch.bool)}, "only 2 tensors of BOOL, I64 (83 B"),
])
def test_a_file_without_weights_is_an_error_not_a_table_of_zeros(tmp_path, capsys, tensors, said):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and said in err and "\nhint: " in err, err
    assert main(["inspect", "--json", str(path)]) == 1
    assert json.loads(capsys.readouterr().out)["exit_code"] == 1


def test_a_built_in_world_model_is_shown_at_bf16_as_plan_counts_it(capsys):
    """Built in F32 on meta, it showed twice the bytes `plan` counts for its blocks."""
    assert main(["inspect", "lucid-500m", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {f for c in doc["components"] for b in c["blocks"] for f in b["formats"]} == {"BF16"}
    assert doc["stored_bytes"] == doc["bytes_by_format"]["BF16"]


@pytest.mark.parametrize("typed, meant", [("lucid-5000m", "lucid-500m"), ("flux-schnel", "flux-schnell")])
def test_a_mistyped_model_name_gets_the_closest_known_one(capsys, typed, meant):
    assert main(["inspect", typed]) == 2
    assert f"unknown model '{typed}' (did you mean {meant}?)" in capsys.readouterr().err


def test_identical_blocks_collapse_whatever_order_their_shards_list_their_tensors(tmp_path, capsys):
    """A sharded model listed each block's tensors in shard order, so identical layers split across shards showed as
    rows of their own (unsharded, the same weights folded into `blocks.0–1 (×2)`)."""
    a, b = torch.zeros(4, 32), torch.zeros(8)
    shards = {"model-00001-of-00002.safetensors": {"m.blocks.0.a": a, "m.blocks.1.b": b},
              "model-00002-of-00002.safetensors": {"m.blocks.0.b": b, "m.blocks.1.a": a}}
    for name, tensors in shards.items():
        save_checkpoint(tmp_path / name, tensors)
    weight_map = {k: name for name, tensors in shards.items() for k in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert main(["inspect", str(tmp_path)]) == 0
    assert "m.blocks.0–1 (×2)" in capsys.readouterr().out
