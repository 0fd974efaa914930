"""Writers: atomic replacement, the format/fallback rules, and refusal of bad arguments.

A failed write must leave neither a temp file nor a damaged previous checkpoint.
"""

from __future__ import annotations

import pytest
import torch

import residency.checkpoint.writer as writer_mod
from residency.checkpoint import (
    CheckpointError,
    choose_format,
    open_checkpoint,
    save_checkpoint,
    write_packed,
)
from residency.errors import FormatError
from residency.formats import FORMATS

EXTS = ["safetensors", "gguf"]


@pytest.mark.parametrize("ext", EXTS)
def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, ext):
    path = save_checkpoint(tmp_path / f"m.{ext}", {"w": torch.ones(2, 4)})
    before = path.read_bytes()

    def half_then_fail(target, *args):  # write_gguf gets the temp path, write_safetensors an open file
        if hasattr(target, "write"):
            target.write(b"partial")
        else:
            target.write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(
        writer_mod, "write_safetensors" if ext == "safetensors" else "write_gguf", half_then_fail
    )
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_checkpoint(path, {"w": torch.zeros(2, 4)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    with open_checkpoint(path) as ck:
        assert torch.equal(ck.read_tensor("w"), torch.ones(2, 4))


def test_os_errors_become_checkpoint_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no_such_dir"):
        save_checkpoint(tmp_path / "no_such_dir" / "m.safetensors", {"w": torch.ones(2)})

    def disk_full(f, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_mod, "write_safetensors", disk_full)
    with pytest.raises(CheckpointError, match="No space left") as err:
        save_checkpoint(tmp_path / "full.safetensors", {"w": torch.ones(2)})
    assert "full.safetensors" in err.value.message
    assert list(tmp_path.iterdir()) == []


def test_new_file_is_not_private(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", {"w": torch.ones(2)})
    assert path.stat().st_mode & 0o044  # readable by group/others, unlike a raw mkstemp file


def test_fallback_rules(tmp_path):
    t = {
        "mat": torch.randn(4, 64),
        "vec": torch.randn(64),
        "odd": torch.randn(4, 10),
        "scalar": torch.tensor(1.0),
    }
    with open_checkpoint(save_checkpoint(tmp_path / "a.gguf", t, "Q8_0")) as ck:
        assert {n: e.format for n, e in ck.entries.items()} == {
            "mat": "Q8_0",
            "vec": "F32",
            "odd": "F32",
            "scalar": "F32",
        }
    with open_checkpoint(save_checkpoint(tmp_path / "b.gguf", t, "Q8_0", fallback="BF16")) as ck:
        assert ck.entries["odd"].format == "BF16" and ck.entries["scalar"].shape == ()
    with pytest.raises(FormatError, match="'odd'"):
        save_checkpoint(tmp_path / "c.gguf", t, "Q8_0", fallback=None)
    # A mapping: "*" is the default; explicitly mapped tensors must fit or fail loudly.
    with open_checkpoint(save_checkpoint(tmp_path / "d.safetensors", t, {"mat": "F16", "*": "Q8_0"})) as ck:
        assert [ck.entries[n].format for n in t] == ["F16", "F32", "F32", "F32"]
    with pytest.raises(FormatError, match="'odd'"):
        save_checkpoint(tmp_path / "e.safetensors", t, {"odd": "Q8_0"})
    with pytest.raises(FormatError, match="not being saved"):
        save_checkpoint(tmp_path / "f.safetensors", t, {"typo": "Q8_0"})
    assert choose_format("v", (64,), "Q8_0", "F32", "F32").name == "Q8_0"  # explicit 1-D is honoured
    assert not (tmp_path / "c.gguf").exists() and not (tmp_path / "e.safetensors").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(FormatError, match="'ids'"):
        save_checkpoint(tmp_path / "m.safetensors", {"ids": torch.arange(4)})
    with pytest.raises(FormatError, match="unknown storage format"):
        save_checkpoint(tmp_path / "m.safetensors", {"w": torch.ones(2, 32)}, "Q9_9")
    if not FORMATS["Q2_K"].can_pack:
        with pytest.raises(FormatError, match="'w'.*dequant-only"):
            save_checkpoint(tmp_path / "m.safetensors", {"w": torch.ones(2, 256)}, {"w": "Q2_K"})
    with pytest.raises(CheckpointError, match="extension"):
        save_checkpoint(tmp_path / "m.pt", {"w": torch.ones(2)})
    with pytest.raises(CheckpointError, match="must be strings"):
        save_checkpoint(tmp_path / "m.safetensors", {"w": torch.ones(2)}, metadata={"steps": 3})
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(tmp_path / "m.gguf", {"w": torch.ones(2)}, metadata={"residency.format.w": "F32"})
    with pytest.raises(CheckpointError, match="__metadata__"):
        save_checkpoint(tmp_path / "m.safetensors", {"__metadata__": torch.ones(2)})
    q = FORMATS["Q8_0"].pack(torch.randn(2, 32))
    with pytest.raises(FormatError, match="'w'.*bytes"):
        write_packed(tmp_path / "m.gguf", {"w": (q[:-1], (2, 32), "Q8_0")})
    with pytest.raises(FormatError, match="uint8"):
        write_packed(tmp_path / "m.gguf", {"w": (q.float(), (2, 32), "Q8_0")})
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_atomically(tmp_path):
    path = save_checkpoint(tmp_path / "m.gguf", {"a": torch.ones(2, 4)}, metadata={"v": "1"})
    save_checkpoint(path, {"b": torch.zeros(3, 4)}, metadata={"v": "2"})
    with open_checkpoint(path) as ck:
        assert list(ck.entries) == ["b"] and ck.metadata["v"] == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("name", ["", 1, "x" * 5000])
@pytest.mark.parametrize("ext", [".safetensors", ".gguf"])
def test_a_name_open_checkpoint_would_refuse_is_not_written(tmp_path, name, ext):
    path = tmp_path / f"m{ext}"
    with pytest.raises(FormatError, match="not a name a checkpoint can hold"):
        save_checkpoint(path, {name: torch.zeros(4, 32), "ok": torch.zeros(4, 32)})
    assert list(tmp_path.iterdir()) == []
