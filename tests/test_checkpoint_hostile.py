"""Hostile and broken files: each must raise CheckpointError naming the file, nothing else.

Hand-built headers cover each lie; hypothesis flips and truncates bytes of valid files.
"""

from __future__ import annotations

import json
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from residency.checkpoint import CheckpointError, open_checkpoint, save_checkpoint

F32 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 9876543\n"


def st_bytes(header, data: bytes = bytes(16), length: int | None = None) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def expect_error(path: Path, match: str | None = None) -> CheckpointError:
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        with open_checkpoint(path) as ck:
            for name in ck.entries:
                ck.read_tensor(name)
    assert path.name in err.value.message, err.value.message
    assert err.value.hint is None or isinstance(err.value.hint, str)
    if match is not None:
        assert match in err.value.message, err.value.message
    assert time.monotonic() - t0 < 5, "a hostile header must fail fast"
    return err.value


SAFETENSORS_CASES = {
    "empty": (b"", "too short"),
    "truncated_length": (b"\x10\x00\x00", "too short"),
    "length_past_file": (st_bytes({"w": F32}, length=10_000), "only"),
    "length_absurd": (st_bytes({"w": F32}, length=2**60), "cap"),
    "not_json": (st_bytes(b"this is not json"), "not valid JSON"),
    "not_utf8": (st_bytes(b'{"\xff\xfe": 1}'), "not valid JSON"),
    "deep_json": (st_bytes(b"[" * 100_000 + b"]" * 100_000, b""), "not valid JSON"),
    "not_a_dict": (st_bytes([1, 2, 3]), "not an object"),
    "entry_not_dict": (st_bytes({"w": [1]}), "not a JSON object"),
    "offsets_past_end": (st_bytes({"w": {**F32, "data_offsets": [0, 16]}}, bytes(8)), "past the end"),
    "offsets_huge": (
        st_bytes({"w": {**F32, "shape": [2**30, 2**30], "data_offsets": [0, 2**62]}}),
        "past the end",
    ),
    "offsets_negative": (st_bytes({"w": {**F32, "data_offsets": [-16, 0]}}), "data_offsets"),
    # printed in inspect's table, the escape sequence cleared and recoloured the terminal, the newline split a row
    "name_escape": (st_bytes({"\x1b[2J\x1b[31mevil.weight": F32}), "holds a control character ('\\x1b')"),
    "name_newline": (st_bytes({"a\nb": F32}), "holds a control character ('\\n')"),
    # a lone surrogate: json reads it, and printing it raised UnicodeEncodeError out of inspect's table
    "name_lone_surrogate": (st_bytes(b'{"w\\ud800": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}'),
                            "is not valid Unicode (a lone surrogate)"),
    "offsets_reversed": (st_bytes({"w": {**F32, "data_offsets": [16, 0]}}, bytes(32)), "data_offsets"),
    "offsets_wrong_arity": (st_bytes({"w": {**F32, "data_offsets": [0]}}), "data_offsets"),
    "offsets_bool": (st_bytes({"w": {**F32, "data_offsets": [False, True]}}), "data_offsets"),
    "overlap": (st_bytes({"a": F32, "b": {**F32, "data_offsets": [8, 24]}}, bytes(24)), "overlap"),
    "unknown_dtype": (st_bytes({"w": {**F32, "dtype": "Q9_Z"}}), "unsupported dtype"),
    "int_dtype_lying_size": (st_bytes({"w": {**F32, "dtype": "I64", "shape": [3]}}), "is not 16 bytes"),
    "u8_without_metadata_lying_size": (st_bytes({"w": {**F32, "dtype": "U8", "shape": [17]}}), "is not 16 bytes"),
    "left_out_overlapping": (st_bytes({"w": F32, "ids": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]}}),
                             "overlap"),
    "dtype_not_str": (st_bytes({"w": {**F32, "dtype": 7}}), "dtype"),
    "size_mismatch": (st_bytes({"w": {**F32, "shape": [2, 3]}}), "takes 24 bytes"),
    "negative_dim": (st_bytes({"w": {**F32, "shape": [-2, -2]}}), "shape"),
    "float_dim": (st_bytes({"w": {**F32, "shape": [2.0, 2]}}), "shape"),
    "bool_dim": (st_bytes({"w": {**F32, "shape": [True, 4]}}), "shape"),
    "absurd_shape": (st_bytes({"w": {**F32, "shape": [2**62, 2**62, 2**62]}}), "shape"),
    "too_many_dims": (st_bytes({"w": {**F32, "shape": [1] * 1000}}), "shape"),
    "metadata_not_str": (st_bytes({"__metadata__": {"a": 1}, "w": F32}), "not a string"),
    "metadata_not_dict": (st_bytes({"__metadata__": "x", "w": F32}), "__metadata__"),
    "duplicate_names": (
        st_bytes(b'{"w":' + json.dumps(F32).encode() + b',"w":' + json.dumps(F32).encode() + b"}"),
        "twice",
    ),
    "unknown_format_meta": (
        st_bytes(
            {
                "__metadata__": {"residency.format.w": "Q9", "residency.shape.w": "4"},
                "w": {**F32, "dtype": "U8", "shape": [16]},
            }
        ),
        "unknown storage format",
    ),
    "format_meta_without_shape": (
        st_bytes({"__metadata__": {"residency.format.w": "F32"}, "w": {**F32, "dtype": "U8", "shape": [16]}}),
        "missing",
    ),
    "bad_shape_meta": (
        st_bytes(
            {
                "__metadata__": {"residency.format.w": "F32", "residency.shape.w": "2,x"},
                "w": {**F32, "dtype": "U8", "shape": [16]},
            }
        ),
        "integers",
    ),
    "shape_meta_wrong_size": (
        st_bytes(
            {
                "__metadata__": {"residency.format.w": "F32", "residency.shape.w": "5"},
                "w": {**F32, "dtype": "U8", "shape": [16]},
            }
        ),
        "bytes",
    ),
    "format_meta_on_f32": (
        st_bytes({"__metadata__": {"residency.format.w": "Q8_0", "residency.shape.w": "4"}, "w": F32}),
        "not raw bytes",
    ),
    "quant_shape_not_block_multiple": (
        st_bytes(
            {
                "__metadata__": {"residency.format.w": "Q8_0", "residency.shape.w": "1,17"},
                "w": {**F32, "dtype": "U8", "shape": [16]},
            }
        ),
        "multiple",
    ),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_hostile_safetensors(tmp_path, case):
    blob, match = SAFETENSORS_CASES[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(blob)
    expect_error(path, match)


def test_truncated_valid_safetensors(tmp_path):
    good = save_checkpoint(
        tmp_path / "good.safetensors", {"a": torch.randn(4, 8), "b": torch.randn(8)}
    ).read_bytes()
    for cut in range(0, len(good), 5):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(good[:cut])
        expect_error(path)


def test_paths_that_are_not_checkpoints(tmp_path):
    expect_error(tmp_path / "missing.safetensors", "no such file")
    (tmp_path / "weights.bin").write_bytes(b"\x80\x02}q\x00.")  # a pickle: never unpickled
    assert "torch.save" in expect_error(tmp_path / "weights.bin", "a Python pickle").hint  # said what it is
    (tmp_path / "weights.xyz").write_bytes(b"\x00\x01 nothing known")
    expect_error(tmp_path / "weights.xyz", "extension")
    (tmp_path / "empty_dir").mkdir()
    expect_error(tmp_path / "empty_dir", "no .safetensors")


@pytest.mark.parametrize("name, content, said, hint", [
    ("model.bin", b"GGUF\x03\x00\x00\x00" + bytes(40), "named .bin, but this is a GGUF file", "rename it to model.gguf"),
    ("model.gguf", st_bytes({"w": F32}), "named .gguf, but this is a safetensors file", "model.safetensors"),
    ("profile.safetensors", json.dumps({"name": "x", "memory": [1] * 20}).encode(), "this is a JSON document",
     ".safetensors or .gguf"),
    ("model.safetensors", b"GGUF\x03\x00\x00\x00" + bytes(40), "named .safetensors, but this is a GGUF file",
     "model.gguf"),
    ("model.gguf", b"PK\x03\x04" + bytes(40), "a zip archive or a Python pickle", "safetensors.torch.save_file"),
    ("notes.md", b"[see the paper](https://x)", "unknown checkpoint extension '.md'", ".safetensors, .gguf"),
    # a Hub repository cloned without `git lfs pull`: "magic b'vers'", "a header of 2336927755350992246 bytes"
    ("model.safetensors", LFS_POINTER, "this is a Git LFS pointer", "git lfs pull"),
    ("model.gguf", LFS_POINTER, "this is a Git LFS pointer", "git lfs pull"),
])
def test_a_file_named_as_another_kind_is_told_by_its_contents(tmp_path, name, content, said, hint):
    """A GGUF renamed .bin was "unknown checkpoint extension"; a profile JSON renamed .safetensors was read as a
    header length of 7521982393043913339 bytes."""
    (tmp_path / name).write_bytes(content)
    assert hint in expect_error(tmp_path / name, said).hint


# --- GGUF --------------------------------------------------------------------------
def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_bytes(kvs=(), tensors=(), data=b"", version=3, counts=None, align=32) -> bytes:
    """A GGUF file by hand: kvs are raw (key, type, payload) triples, tensors (name, ggml dims, type, offset)."""
    n_t, n_kv = counts if counts is not None else (len(tensors), len(kvs))
    out = b"GGUF" + struct.pack("<IQQ", version, n_t, n_kv)
    for key, vtype, payload in kvs:
        out += gstr(key) + struct.pack("<I", vtype) + payload
    for name, dims, ttype, offset in tensors:
        out += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ttype, offset)
    out += bytes(-len(out) % align)
    return out + data


F32_T = ("w", [4, 2], 0, 0)  # ggml dims: 2 rows of 4 → torch (2, 4), 32 bytes
STRING, ARRAY, UINT32, UINT8 = 8, 9, 4, 0

GGUF_CASES = {
    "bad_magic": (b"GGUX" + bytes(60), "not a GGUF"),
    "too_short": (b"GGUF\x03\x00", "too short"),
    "big_endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0) + bytes(8), "big-endian"),
    "version_99": (gguf_bytes(version=99), "version 99 is not supported"),
    # the magic then noise: it was "a newer GGUF than this residency reads: update residency"
    "version_noise": (gguf_bytes(version=3038271173), "version field reads 3038271173, no GGUF version"),
    "tensor_count_huge": (gguf_bytes(counts=(2**60, 0)), "claims"),
    "kv_count_huge": (gguf_bytes(counts=(0, 2**40)), "claims"),
    "array_count_huge": (gguf_bytes([("a", ARRAY, struct.pack("<IQ", UINT8, 2**60))]), "claims"),
    "string_array_count_huge": (gguf_bytes([("a", ARRAY, struct.pack("<IQ", STRING, 2**40))]), "claims"),
    # refused by length before any byte is read or decoded (a sparse file's 512 MiB name took 1.8 GB to decode)
    "string_len_huge": (gguf_bytes([("a", STRING, struct.pack("<Q", 2**62))]), "bytes long, more than the 16777216"),
    "key_len_huge": (
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**63) + bytes(40),
        "bytes long, more than the 16384",
    ),
    "string_past_the_cap": (gguf_bytes([("general.name", STRING, struct.pack("<Q", 2**24 + 1) + bytes(2**24 + 1))]),
                            "general.name' is 16777217 bytes long"),
    "string_past_the_end": (gguf_bytes([("a", STRING, struct.pack("<Q", 2**20))]), "truncated"),
    "unknown_value_type": (gguf_bytes([("a", 77, b"\x00" * 8)]), "unknown value type"),
    "nested_arrays": (
        gguf_bytes([("a", ARRAY, struct.pack("<IQ", ARRAY, 1) * 5 + struct.pack("<IQ", UINT8, 0))]),
        "nests",
    ),
    "rank_huge": (
        b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + gstr("w") + struct.pack("<I", 2**31) + bytes(64),
        "dimensions",
    ),
    "iq_quant": (gguf_bytes(tensors=[("w", [256, 2], 16, 0)], data=bytes(160)), "IQ2_XXS, a GGUF quant type residency"),
    "five_dims": (gguf_bytes(tensors=[("w", [4, 2, 1, 1, 1], 0, 0)], data=bytes(32)), "at most 4"),
    "tensor_past_end": (gguf_bytes(tensors=[F32_T], data=bytes(16)), "outside"),
    "tensor_offset_huge": (gguf_bytes(tensors=[("w", [4, 2], 0, 2**63)], data=bytes(32)), "outside"),
    "unknown_ggml_type": (gguf_bytes(tensors=[("w", [4, 2], 9999, 0)], data=bytes(32)), "unknown ggml type"),
    # I32 and unnamed I8 tensors are left out (listed apart), their bytes still checked
    "left_out_i32_past_end": (gguf_bytes(tensors=[("w", [4, 2], 26, 0)], data=bytes(16)), "outside the data"),
    "left_out_raw_i8_past_end": (gguf_bytes(tensors=[("w", [32], 24, 0)], data=bytes(16)), "outside the data"),
    "left_out_overlapping": (gguf_bytes(tensors=[F32_T, ("ids", [4], 26, 0)], data=bytes(64)), "overlap"),
    "overlap": (gguf_bytes(tensors=[F32_T, ("v", [4, 2], 0, 16)], data=bytes(64)), "overlap"),
    "duplicate_tensor": (gguf_bytes(tensors=[F32_T, ("w", [4, 2], 0, 32)], data=bytes(64)), "twice"),
    "duplicate_key": (gguf_bytes([("k", UINT32, bytes(4)), ("k", UINT32, bytes(4))]), "twice"),
    "row_not_block_multiple": (
        gguf_bytes(tensors=[("w", [33, 1], 8, 0)], data=bytes(64)),
        "multiple",
    ),  # Q8_0
    "absurd_dims": (gguf_bytes(tensors=[("w", [2**62, 2**62], 0, 0)], data=bytes(64)), "spans"),
    "bad_alignment": (gguf_bytes([("general.alignment", UINT32, struct.pack("<I", 3))]), "alignment"),
    "alignment_a_string": (gguf_bytes([("general.alignment", STRING, struct.pack("<Q", 2) + b"32")]),
                           "general.alignment is a string, not a uint32"),
    "non_utf8_name": (gguf_bytes(tensors=[(b"\xff\xfe", [4, 2], 0, 0)], data=bytes(32)), "UTF-8"),
    "format_meta_not_string": (
        gguf_bytes([("residency.format.w", UINT32, bytes(4))], tensors=[("w", [32], 24, 0)], data=bytes(32)),
        "must be a string",
    ),
    "format_meta_wrong_size": (
        gguf_bytes(
            [("residency.format.w", STRING, gstr("NF4")), ("residency.shape.w", STRING, gstr("2,64"))],
            tensors=[("w", [32], 24, 0)],
            data=bytes(32),
        ),
        "bytes",
    ),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_hostile_gguf(tmp_path, case):
    blob, match = GGUF_CASES[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(blob)
    expect_error(path, match)


def test_hand_built_gguf_is_readable(tmp_path):
    # The builder itself is right: a well-formed file opens, so the cases above fail for their lie.
    path = tmp_path / "ok.gguf"
    path.write_bytes(
        gguf_bytes([("k", STRING, gstr("v"))], tensors=[F32_T], data=struct.pack("<8f", *range(8)))
    )
    with open_checkpoint(path) as ck:
        assert ck.entries["w"].shape == (2, 4)
        assert torch.equal(ck.read_tensor("w"), torch.arange(8.0).reshape(2, 4))
        assert ck.metadata == {"k": "v"}


def test_truncated_valid_gguf(tmp_path):
    path = save_checkpoint(tmp_path / "good.gguf", {"a": torch.randn(4, 32), "b": torch.randn(2, 64)}, "Q8_0")
    good = path.read_bytes()
    with open_checkpoint(path) as ck:
        data_end = max(e.offset + e.nbytes for e in ck.entries.values())  # the rest is alignment padding
    for cut in [*range(0, data_end, 7), data_end - 1]:
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(good[:cut])
        expect_error(path)


# --- fuzz ----------------------------------------------------------------------------
def _valid(ext: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        tensors = {"a": torch.randn(2, 32), "b": torch.randn(32), "c": torch.randn(1, 64)}
        formats = {"a": "Q8_0", "c": "FP8"}
        return save_checkpoint(Path(d) / f"v.{ext}", tensors, formats, {"note": "fuzz"}).read_bytes()


VALID = {ext: _valid(ext) for ext in ("safetensors", "gguf")}
mutations = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6)


def _mutated_open(ext: str, flips, cut: int | None) -> None:
    blob = bytearray(VALID[ext])
    for pos, val in flips:
        blob[pos % len(blob)] = val
    if cut is not None:
        blob = blob[: cut % (len(blob) + 1)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz.{ext}"
        path.write_bytes(bytes(blob))
        try:
            with open_checkpoint(path) as ck:
                for name in ck.entries:
                    ck.read_tensor(name)
        except CheckpointError as e:
            assert path.name in e.message


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=mutations, cut=st.none() | st.integers(0, 10**6))
def test_fuzz_safetensors_only_checkpoint_error(flips, cut):
    _mutated_open("safetensors", flips, cut)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=mutations, cut=st.none() | st.integers(0, 10**6))
def test_fuzz_gguf_only_checkpoint_error(flips, cut):
    _mutated_open("gguf", flips, cut)


def test_a_text_file_or_a_renamed_gguf_named_safetensors_is_called_what_it_is(tmp_path):
    from residency.checkpoint import CheckpointError, open_checkpoint, save_checkpoint

    text = tmp_path / "notes.safetensors"
    text.write_text("hello world, this is text\n")
    with pytest.raises(CheckpointError, match="not a safetensors file: its first 8 bytes"):
        open_checkpoint(text)
    save_checkpoint(tmp_path / "w.gguf", {"w": torch.zeros(4, 32)})
    renamed = tmp_path / "w.safetensors"
    (tmp_path / "w.gguf").rename(renamed)
    with pytest.raises(CheckpointError, match="this is a GGUF file") as err:
        open_checkpoint(renamed)
    assert "w.gguf" in err.value.hint


def test_tensors_of_other_dtypes_are_left_out_listed_not_refused(tmp_path):
    """A CLIP text encoder's I64 position_ids (and masks, float64 tables) made the whole file unreadable."""
    path = tmp_path / "clip.safetensors"
    header = {"w": F32, "ids": {"dtype": "I64", "shape": [1, 2], "data_offsets": [16, 32]},
              "mask": {"dtype": "BOOL", "shape": [4], "data_offsets": [32, 36]}}
    path.write_bytes(st_bytes(header, bytes(36)))
    with open_checkpoint(path) as ck:
        assert list(ck.entries) == ["w"]
        assert [(o.name, o.dtype, o.shape, o.nbytes) for o in ck.left_out] == [("ids", "I64", (1, 2), 16),
                                                                              ("mask", "BOOL", (4,), 4)]


def test_integer_and_f64_tensors_of_a_gguf_are_left_out_listed_as_in_safetensors(tmp_path):
    """A GGUF's I32 tensor refused the whole file ("unsupported dtype 'I32'"), its hint saying such tensors are
    listed apart: they are now, as safetensors' are, and one lying about its size is still refused."""
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(path, arch="test")
    writer.add_tensor("blk.0.weight", np.ones((4, 32), dtype=np.float32))
    writer.add_tensor("blk.0.ids", np.arange(10, dtype=np.int32))
    writer.add_tensor("table", np.zeros(3, dtype=np.float64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open_checkpoint(path) as ck:
        assert list(ck.entries) == ["blk.0.weight"]
        assert torch.equal(ck.read_tensor("blk.0.weight"), torch.ones(4, 32))
        assert sorted((o.name, o.dtype, o.shape, o.nbytes) for o in ck.left_out) == [
            ("blk.0.ids", "I32", (10,), 40), ("table", "F64", (3,), 24)]
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 30])  # the last tensor's bytes cut
    expect_error(path)


def test_float64_weights_are_told_to_be_converted_not_blamed_on_another_quantizer(tmp_path, capsys):
    from residency.cli import main

    path = tmp_path / "f64.safetensors"
    path.write_bytes(st_bytes({"w": F32, "big": {"dtype": "F64", "shape": [8, 8], "data_offsets": [16, 528]}},
                              bytes(528)))
    assert main(["inspect", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "the model's weights are float64, which residency does not store; convert them to F32, F16 or BF16" in out
    assert "another tool" not in out


def test_a_control_character_in_a_name_gets_the_rename_hint(tmp_path):
    path = tmp_path / "n.safetensors"
    path.write_bytes(st_bytes({"a\nb": F32}))
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    assert "rename the tensor" in err.value.hint


def _comfy_gguf(path, orig):
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    x = np.random.default_rng(0).standard_normal((320, 4, 3, 3)).astype(np.float32)
    writer = GGUFWriter(str(path), arch="sdxl")
    writer.add_array("comfy.gguf.orig_shape.input_blocks.0.0.weight", orig)
    writer.add_tensor("input_blocks.0.0.weight", quantize(x.reshape(-1, 256), GGMLQuantizationType.Q8_0),
                      raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return x


def test_a_comfyui_gguf_tensor_has_the_shape_its_converter_recorded(tmp_path):
    """ComfyUI-GGUF stores an SD/SDXL conv weight as (n/256, 256) and its own shape in comfy.gguf.orig_shape.*:
    inspect showed (45, 256), and sized it per format as a matrix whose rows quantize (a 3×3 kernel does not)."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    path = tmp_path / "sdxl.gguf"
    x = _comfy_gguf(path, [320, 4, 3, 3])
    with open_checkpoint(path) as ck:
        e = ck.entry("input_blocks.0.0.weight")
        assert (e.shape, e.stored_shape, e.format) == ((320, 4, 3, 3), (45, 256), "Q8_0")
        got = ck.read_tensor("input_blocks.0.0.weight")
        raw = np.frombuffer(ck.read_packed("input_blocks.0.0.weight").numpy().tobytes(), dtype=np.uint8)
    want = dequantize(raw.reshape(45, -1), GGMLQuantizationType.Q8_0).reshape(x.shape)
    assert got.shape == x.shape and np.array_equal(got.numpy(), want)
    _comfy_gguf(path, [320, 4, 3, 4])  # a shape of other weights than the tensor's: refused, naming the key
    expect_error(path, "comfy.gguf.orig_shape.input_blocks.0.0.weight' is [320, 4, 3, 4], 15360 weights")
