"""Every size a header implies is bounded by the bytes the file holds, before anything is allocated.

Unit tests of residency/checkpoint/limits.py, then the end-to-end cases that once escaped it:
a zero dimension beside a 2^63 one, raw FP8 [rows, 0], unaligned GGUF offsets, oversized headers.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from residency.checkpoint import CheckpointError, limits, open_checkpoint, safetensors_io, save_checkpoint
from residency.checkpoint.limits import (
    EMPTY_TENSOR_SLACK_BYTES,
    MAX_DIMS,
    MAX_EXTENT,
    check_dims,
    tensor_nbytes,
)
from residency.formats import get_format
from tools.hostile_files import ARRAY, STRING, UINT32, gguf_file, gguf_str, st_file

P = Path("x.safetensors")


def refused(fn, *args, match: str | None = None) -> CheckpointError:
    with pytest.raises(CheckpointError) as err:
        fn(*args)
    if match is not None:
        assert match in err.value.message, err.value.message
    return err.value


# --- check_dims ----------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [[0, 2**63], [2**63, 0], [0, 2**64 - 1], [0, MAX_EXTENT + 1], [0, 2**40, 2**40]])
def test_a_zero_dimension_does_not_unbound_the_others(dims):
    refused(check_dims, P, "w", dims, match="spans more than")


def test_the_extent_bound_is_inclusive():
    assert check_dims(P, "w", [0, MAX_EXTENT]) == (0, MAX_EXTENT)
    assert check_dims(P, "w", [2**24, 2**24]) == (2**24, 2**24)
    refused(check_dims, P, "w", [2**24, 2**24, 2], match="spans more than")


@pytest.mark.parametrize("dims", [[True, 4], [2.0, 2], ["4"], [-1], None, "4,4", [1] * (MAX_DIMS + 1)])
def test_dims_must_be_a_short_list_of_non_negative_ints(dims):
    refused(check_dims, P, "w", dims)


# --- tensor_nbytes ---------------------------------------------------------------------------
def test_stored_bytes_must_match_the_shape_exactly():
    f32 = get_format("F32")
    assert tensor_nbytes(P, "w", f32, (2, 3), 24, False) == 24
    refused(tensor_nbytes, P, "w", f32, (2, 3), 25, False, match="takes 24 bytes")
    assert tensor_nbytes(P, "s", f32, (), 4, False) == 4  # a scalar packs like (1,)


def test_raw_fp8_gains_row_scales_only_within_the_bound():
    fp8 = get_format("FP8")
    assert tensor_nbytes(P, "w", fp8, (3, 5), 15, True) == 3 * 4 + 15
    rows = EMPTY_TENSOR_SLACK_BYTES // 4
    assert tensor_nbytes(P, "w", fp8, (rows, 0), 0, True) == rows * 4
    refused(tensor_nbytes, P, "w", fp8, (rows + 1, 0), 0, True, match="in memory")


def test_a_shape_the_format_cannot_hold_is_a_checkpoint_error():
    refused(tensor_nbytes, P, "w", get_format("Q8_0"), (2, 17), 34, False, match="multiple of 32")


# --- end to end --------------------------------------------------------------------------------
def read_all(path: Path) -> None:
    with open_checkpoint(path) as ck:
        for name in ck.entries:
            ck.read_tensor(name)


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F8_E4M3"])
def test_zero_then_huge_dimension_is_refused_not_a_type_error(tmp_path, dtype):
    path = tmp_path / "z.safetensors"
    path.write_bytes(st_file({"w": {"dtype": dtype, "shape": [0, 2**63], "data_offsets": [0, 0]}}, b""))
    refused(read_all, path, match="spans more than")


def test_raw_fp8_with_empty_rows_is_refused_before_read_packed_allocates(tmp_path):
    # 88 bytes on disk that once made read_packed allocate rows × 4 bytes (1 GiB here).
    path = tmp_path / "f8.safetensors"
    path.write_bytes(st_file({"w": {"dtype": "F8_E4M3", "shape": [2**28, 0], "data_offsets": [0, 0]}}, b""))
    refused(read_all, path, match="in memory")


def test_gguf_zero_dimension_beside_a_huge_one_is_refused(tmp_path):
    path = tmp_path / "z.gguf"
    path.write_bytes(gguf_file(tensors=[("w", [2**63, 0], 0, 0)]))
    refused(read_all, path, match="spans more than")


def test_gguf_offset_off_the_alignment_is_refused(tmp_path):
    path = tmp_path / "u.gguf"
    path.write_bytes(gguf_file(tensors=[("w", [4, 1], 0, 0), ("v", [4, 1], 0, 16)], data=bytes(64)))
    refused(read_all, path, match="not a multiple of the file's alignment 32")


def test_gguf_offsets_on_a_declared_alignment_read(tmp_path):
    align = struct.pack("<I", 16)
    path = tmp_path / "a16.gguf"
    data = struct.pack("<8f", *range(8))
    path.write_bytes(
        gguf_file([("general.alignment", UINT32, align)], [("w", [4, 1], 0, 0), ("v", [4, 1], 0, 16)], data, align=16)
    )
    with open_checkpoint(path) as ck:
        assert ck.read_tensor("v").flatten().tolist() == [4.0, 5.0, 6.0, 7.0]


@pytest.mark.parametrize("value", [0, 3, 48, 2**17, 2**31])
def test_gguf_alignment_must_be_a_small_power_of_two(tmp_path, value):
    path = tmp_path / "a.gguf"
    path.write_bytes(gguf_file([("general.alignment", UINT32, struct.pack("<I", value))]))
    refused(read_all, path, match="general.alignment")


def test_gguf_alignment_of_another_type_is_refused(tmp_path):
    path = tmp_path / "a.gguf"
    path.write_bytes(gguf_file([("general.alignment", STRING, gguf_str("32"))]))
    refused(read_all, path, match="general.alignment")


def test_gguf_tokenizer_sized_string_arrays_are_skipped(tmp_path):
    count = 50_000
    tokens = struct.pack("<IQ", STRING, count) + gguf_str("tok") * count
    path = tmp_path / "tok.gguf"
    path.write_bytes(gguf_file([("tokenizer.ggml.tokens", ARRAY, tokens)], [("w", [4, 1], 0, 0)], bytes(16)))
    with open_checkpoint(path) as ck:
        assert list(ck.entries) == ["w"]
        assert "tokenizer.ggml.tokens" not in ck.metadata
    path.write_bytes(gguf_file([("t", ARRAY, tokens[:-2])]))
    refused(read_all, path, match="truncated")


def test_a_header_over_the_cap_is_refused_from_its_length_field(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", safetensors_io.HEADER_CAP + 1) + b"{" + bytes(64))
    refused(read_all, path, match="more than the")


def test_a_container_bomb_is_refused_before_json_builds_it(tmp_path, monkeypatch):
    def no_json(*args, **kwargs):
        raise AssertionError("json.loads ran on a header that a count could refuse")

    path = tmp_path / "bomb.safetensors"
    units = 3 * limits.MAX_TENSORS + 8192
    path.write_bytes(st_file(b'{"x":[' + b"{}," * units + b"{}]}", b""))
    monkeypatch.setattr(safetensors_io.json, "loads", no_json)
    refused(read_all, path, match="JSON objects and arrays")


def test_more_tensors_than_the_cap_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_TENSORS", 3)
    header = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(4)}
    for suffix, blob in {
        ".safetensors": st_file(header, bytes(16)),
        ".gguf": gguf_file(tensors=[(f"t{i}", [8], 0, 32 * i) for i in range(4)], data=bytes(128)),
    }.items():
        path = tmp_path / f"many{suffix}"
        path.write_bytes(blob)
        refused(read_all, path, match="more than the 3")


def test_the_writer_refuses_what_the_reader_would(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_io, "MAX_TENSORS", 2)
    target = tmp_path / "w.safetensors"
    refused(save_checkpoint, target, {f"t{i}": torch.zeros(2) for i in range(3)}, match="at most 2 tensors")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_overlong_tensor_names_are_refused(tmp_path):
    path = tmp_path / "n.safetensors"
    path.write_bytes(st_file({"n" * 5000: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)))
    refused(read_all, path, match="more than the 4096 residency reads")


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    import os

    os.mkfifo(fifo)
    refused(open_checkpoint, fifo, match="not a regular file")


def test_json_metadata_text_inside_a_header_is_not_counted_as_structure(tmp_path):
    config = json.dumps({"layers": [{"a": [1, 2]}] * 50})  # braces inside a string value
    path = save_checkpoint(tmp_path / "c.safetensors", {"w": torch.ones(2)}, metadata={"config": config})
    with open_checkpoint(path) as ck:
        assert ck.metadata["config"] == config


@pytest.mark.parametrize("header, data, said", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, bytes(24), "'b' starts at byte 16"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(108), "100 bytes after the last tensor"),
])
def test_a_data_section_with_a_gap_or_trailing_bytes_is_refused_as_the_reference_reader_refuses_it(tmp_path, header,
                                                                                                    data, said):
    path = tmp_path / "g.safetensors"
    path.write_bytes(st_file(header, data))
    refused(read_all, path, match=said)


def test_an_empty_tensor_name_is_blamed_on_the_name_not_on_a_corrupt_file(tmp_path):
    path = tmp_path / "e.safetensors"
    path.write_bytes(st_file({"": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)))
    err = refused(read_all, path, match="a tensor name is empty")
    assert "rename the tensor" in err.hint


def test_a_fifo_among_a_directorys_shards_is_told_to_move_not_to_be_copied_into_place(tmp_path):
    import os

    (tmp_path / "b.safetensors").write_bytes(st_file({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                                                     bytes(4)))
    os.mkfifo(tmp_path / "a.safetensors")
    err = refused(open_checkpoint, tmp_path, match="is not a file")
    assert "move it out of the directory" in err.hint
