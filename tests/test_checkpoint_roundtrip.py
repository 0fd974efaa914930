"""Round trips through .safetensors and .gguf: exact floats, bit-identical packed blobs, torch shapes.

Also cross-checks against files written by the reference libraries (safetensors, gguf-py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from residency.checkpoint import CheckpointError, open_checkpoint, save_checkpoint, write_packed
from residency.formats import FORMATS

EXTS = ["safetensors", "gguf"]


def packable(name: str):
    """The format, or skip when the registry cannot pack it yet."""
    fmt = FORMATS.get(name)
    if fmt is None or not fmt.can_pack:
        pytest.skip(f"{name} has no pack implementation in the registry yet")
    try:
        fmt.pack(torch.randn(2, 256))
    except (NotImplementedError, ImportError) as e:
        pytest.skip(f"{name} pack unavailable: {e}")
    return fmt


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "blocks.0.attn.weight": torch.randn(3, 256, generator=g),  # non-square 2-D
        "blocks.0.ff.weight": torch.randn(2, 4, 256, generator=g),  # 3-D
        "blocks.0.conv3d.weight": torch.randn(2, 3, 1, 2, 256, generator=g),  # 5-D: past ggml's 4 dims
        "blocks.0.norm.bias": torch.randn(256, generator=g),  # 1-D: falls back for quantized defaults
        "logit_scale": torch.tensor(2.5),  # 0-D
    }


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("fmt", ["F32", "F16", "BF16"])
def test_float_formats_round_trip_exactly(tmp_path, tensors, ext, fmt):
    path = save_checkpoint(tmp_path / f"m.{ext}", tensors, fmt, {"origin": "test"})
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[fmt]
    with open_checkpoint(path) as ck:
        assert list(ck.entries) == list(tensors)
        assert ck.metadata["origin"] == "test"
        for name, t in tensors.items():
            e = ck.entries[name]
            assert (e.shape, e.format, e.path) == (tuple(t.shape), fmt, path)
            got = ck.read_tensor(name, dtype)
            assert got.dtype == dtype and torch.equal(got, t.to(dtype))
        assert ck.total_bytes == sum(t.numel() * dtype.itemsize for t in tensors.values())


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("fmt_name", ["Q8_0", "Q4_K", "Q6_K", "FP8", "NF4"])
def test_quantized_blobs_read_back_bit_identical(tmp_path, tensors, ext, fmt_name):
    fmt = packable(fmt_name)
    path = save_checkpoint(tmp_path / f"m.{ext}", tensors, fmt_name)
    with open_checkpoint(path) as ck:
        for name, t in tensors.items():
            e = ck.entries[name]
            expect_fmt = fmt if t.dim() >= 2 else FORMATS["F32"]  # default fallback for 0-D/1-D
            assert e.format == expect_fmt.name and e.shape == tuple(t.shape)
            packed = ck.read_packed(name)
            want = expect_fmt.pack(t.reshape(t.shape if t.dim() else (1,)))
            assert packed.dtype == torch.uint8 and torch.equal(packed, want)
            assert e.nbytes == packed.numel()
            assert torch.equal(
                ck.read_tensor(name), expect_fmt.dequantize(want, e.shape or (1,)).reshape(e.shape)
            )


def test_gguf_shapes_are_torch_order_and_ggml_dims_reversed(tmp_path, tensors):
    path = save_checkpoint(tmp_path / "m.gguf", tensors, "Q8_0")
    raw = {t.name: [int(d) for d in t.shape] for t in GGUFReader(path).tensors}
    assert raw["blocks.0.attn.weight"] == [256, 3]
    assert raw["blocks.0.ff.weight"] == [256, 4, 2]
    assert raw["blocks.0.conv3d.weight"] == [256, 2, 1, 6]  # leading dims folded: a file llama.cpp loads
    with open_checkpoint(path) as ck:
        assert ck.entries["blocks.0.attn.weight"].shape == (3, 256)
        assert ck.entries["blocks.0.ff.weight"].shape == (2, 4, 256)
        assert ck.entries["blocks.0.conv3d.weight"].shape == (2, 3, 1, 2, 256)


def test_reads_gguf_written_by_gguf_py_with_reference_quantizer(tmp_path):
    w = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    q = gguf_quantize(w, GGMLQuantizationType.Q8_0)
    writer = GGUFWriter(tmp_path / "ref.gguf", arch="llama")
    writer.add_uint32("llama.block_count", 7)
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(200)])  # long array: skipped
    writer.add_array("small", [1, 2, 3])
    writer.add_tensor("w", q, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("v", w[0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open_checkpoint(tmp_path / "ref.gguf") as ck:
        assert ck.metadata["general.architecture"] == "llama"
        assert ck.metadata["llama.block_count"] == "7"
        assert ck.metadata["small"] == "[1, 2, 3]"
        assert "tokenizer.ggml.tokens" not in ck.metadata
        assert ck.entries["w"].shape == (5, 64) and ck.entries["w"].format == "Q8_0"
        assert np.array_equal(ck.read_packed("w").numpy(), q.reshape(-1))
        assert np.array_equal(ck.read_tensor("w").numpy(), gguf_dequantize(q, GGMLQuantizationType.Q8_0))
        assert np.array_equal(ck.read_tensor("v").numpy(), w[0])


def test_safetensors_interoperates_with_the_reference_library(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    ref = {
        "a": torch.randn(4, 8),
        "b": torch.randn(3, 5).to(torch.bfloat16),
        "c": torch.randn(2, 6).to(torch.float8_e4m3fn),
    }
    save_file(ref, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    with open_checkpoint(tmp_path / "ref.safetensors") as ck:
        assert ck.metadata == {"format": "pt"}
        assert torch.equal(ck.read_tensor("a"), ref["a"])
        assert torch.equal(ck.read_tensor("b", torch.bfloat16), ref["b"])
        e = ck.entries["c"]
        assert (e.format, e.nbytes, e.zero_copy) == ("FP8", 12, False)  # raw e4m3: unit scales rebuilt
        assert ck.read_packed("c").numel() == FORMATS["FP8"].nbytes((2, 6))
        assert torch.equal(ck.read_tensor("c"), ref["c"].float())
    ours = save_checkpoint(
        tmp_path / "ours.safetensors",
        {"x": torch.randn(3, 64), "y": torch.randn(3, 64)},
        {"x": "F16", "*": "Q8_0"},
    )
    with safe_open(ours, "pt") as f:
        assert f.get_tensor("x").dtype == torch.float16
        assert f.get_tensor("y").dtype == torch.uint8
        assert f.metadata()["residency.format.y"] == "Q8_0"
        assert f.metadata()["residency.shape.y"] == "3,64"


@pytest.mark.parametrize("ext", EXTS)
def test_directory_of_mixed_shards_in_sorted_order(tmp_path, ext):
    a, b = torch.randn(2, 32), torch.randn(4, 32)
    save_checkpoint(tmp_path / f"model-00002.{ext}", {"b": b}, metadata={"shard": "2"})
    save_checkpoint(tmp_path / "model-00001.safetensors", {"a": a}, metadata={"shard": "1", "only1": "x"})
    (tmp_path / "notes.txt").write_text("ignored")
    with open_checkpoint(tmp_path) as ck:
        assert [p.name for p in ck.paths] == ["model-00001.safetensors", f"model-00002.{ext}"]
        assert list(ck.entries) == ["a", "b"]
        assert ck.metadata["shard"] == "1" and ck.metadata["only1"] == "x"
        assert torch.equal(ck.read_tensor("b"), b)
        assert ck.entries["b"].path.name == f"model-00002.{ext}"


def test_duplicate_names_across_shards(tmp_path):
    save_checkpoint(tmp_path / "a.safetensors", {"w": torch.randn(2, 2)})
    save_checkpoint(tmp_path / "b.gguf", {"w": torch.randn(2, 2)})
    with pytest.raises(CheckpointError, match="b.gguf") as err:
        open_checkpoint(tmp_path)
    assert "a.safetensors" in err.value.message


@pytest.mark.parametrize("ext", EXTS)
def test_write_packed_and_empty_tensors(tmp_path, ext):
    fmt = FORMATS["Q8_0"]
    w = torch.randn(2, 64)
    path = write_packed(
        tmp_path / f"p.{ext}",
        {"q": (fmt.pack(w), (2, 64), "q8_0"), "empty": (torch.empty(0, dtype=torch.uint8), (0, 32), "Q8_0")},
        {"k": ""},
    )
    with open_checkpoint(path) as ck:
        assert torch.equal(ck.read_packed("q"), fmt.pack(w))
        assert ck.read_tensor("empty").shape == (0, 32)
        assert ck.metadata["k"] == ""


def test_read_packed_is_a_view_not_a_copy_and_close_is_safe(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", {"w": torch.arange(8.0).reshape(2, 4)})
    ck = open_checkpoint(path)
    first = ck.read_packed("w")
    assert first.untyped_storage().nbytes() == 32  # exactly its bytes of the map, not a file-sized read
    ck.close()
    assert torch.equal(first.view(torch.float32), torch.arange(8.0))  # still valid after close
    with pytest.raises(CheckpointError, match="closed"):
        ck.read_packed("w")
    with pytest.raises(CheckpointError, match="no tensor named"):
        ck.entry("missing")


def test_header_parser_agrees_with_gguf_reader(tmp_path, tensors):
    path = save_checkpoint(
        tmp_path / "m.gguf", tensors, {"*": "Q6_K", "blocks.0.ff.weight": "FP8"}, {"k": "v"}
    )
    ref = {t.name: t for t in GGUFReader(path).tensors}
    with open_checkpoint(path) as ck:
        assert set(ck.entries) == set(ref)
        for name, e in ck.entries.items():
            assert e.offset == ref[name].data_offset and e.nbytes == ref[name].n_bytes


def test_long_metadata_arrays_are_skipped_fast(tmp_path):
    import time

    writer = GGUFWriter(tmp_path / "vocab.gguf", arch="llama")
    writer.add_array("tokenizer.ggml.scores", [0.5] * 300_000)
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(100_000)])
    writer.add_float32("rope.freq_base", 0.1)
    writer.add_bool("flag", True)
    writer.add_tensor("w", np.ones((2, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    t0 = time.monotonic()
    with open_checkpoint(tmp_path / "vocab.gguf") as ck:
        assert time.monotonic() - t0 < 2.0  # GGUFReader would build 400k numpy objects here
        assert ck.metadata == {"general.architecture": "llama", "rope.freq_base": "0.1", "flag": "true"}
        assert torch.equal(ck.read_tensor("w"), torch.ones(2, 8))


@pytest.mark.parametrize("index", [False, True])
def test_a_directory_missing_some_shards_is_refused_naming_them(tmp_path, index):
    import json

    save_checkpoint(tmp_path / "model-00001-of-00003.safetensors", {"a": torch.zeros(4, 4)})
    save_checkpoint(tmp_path / "model-00003-of-00003.safetensors", {"c": torch.zeros(4, 4)})
    if index:
        (tmp_path / "model-00003-of-00003.safetensors").unlink()
        weight_map = {k: f"model-0000{i}-of-00003.safetensors" for i, k in ((1, "a"), (2, "b"), (3, "c"))}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"shard\(s\) of this checkpoint are missing: model-00002-of-00003"):
        open_checkpoint(tmp_path)
    save_checkpoint(tmp_path / "model-00002-of-00003.safetensors", {"b": torch.zeros(4, 4)})
    if index:
        save_checkpoint(tmp_path / "model-00003-of-00003.safetensors", {"c": torch.zeros(4, 4)})
    with open_checkpoint(tmp_path) as ck:
        assert sorted(ck.entries) == ["a", "b", "c"]


def test_an_index_whose_shards_are_all_missing_names_them_from_inspect(tmp_path, capsys):
    import json

    from residency.cli import main

    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # was "a directory with no model in it": the download had not started, and the index said which files to fetch
    assert main(["inspect", str(tmp_path)]) == 1
    assert "2 shard(s) of this checkpoint are missing: model-00001-of-00002.safetensors" in capsys.readouterr().err


def test_an_index_of_other_files_does_not_make_shards_missing(tmp_path):
    import json

    save_checkpoint(tmp_path / "model.safetensors", {"a": torch.zeros(4, 4)})
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_checkpoint(tmp_path) as ck:  # a safetensors-only download of a repository that ships both
        assert sorted(ck.entries) == ["a"]


def _sharded(tmp_path, weight_map) -> None:
    import json

    save_checkpoint(tmp_path / "model-00001-of-00002.safetensors", {"a": torch.zeros(4, 4)})
    save_checkpoint(tmp_path / "model-00002-of-00002.safetensors", {"b": torch.zeros(4, 4)})
    text = weight_map if isinstance(weight_map, str) else json.dumps(weight_map)
    (tmp_path / "model.safetensors.index.json").write_text(text)


GOOD_MAP = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}


@pytest.mark.parametrize(("index", "problem"), [
    ({"weight_map": {**GOOD_MAP["weight_map"], "ghost": "model-00002-of-00002.safetensors"}},
     "names tensor 'ghost' in 'model-00002-of-00002.safetensors', which does not hold it"),
    ({"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}},
     "puts tensor 'a' in 'model-00002-of-00002.safetensors'; it is in 'model-00001-of-00002.safetensors'"),
    ("[1]", "not a shard index"),
    ({"metadata": {}}, "not a shard index"),
    ({"weight_map": {**GOOD_MAP["weight_map"], "a": "../model-00001-of-00002.safetensors"}}, "outside this directory"),
])
def test_an_index_that_does_not_describe_its_shards_is_refused(tmp_path, index, problem):
    """They read as the shards alone before: a ghost tensor, a tensor moved, a broken index passed unnoticed."""
    _sharded(tmp_path, index)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json") as err:
        open_checkpoint(tmp_path)
    assert problem in err.value.message


def test_a_shard_no_index_names_is_refused_and_the_described_directory_reads(tmp_path):
    _sharded(tmp_path, {"weight_map": {k: f"./{v}" for k, v in GOOD_MAP["weight_map"].items()}})  # beside it too
    with open_checkpoint(tmp_path) as ck:
        assert sorted(ck.entries) == ["a", "b"]
    save_checkpoint(tmp_path / "stray.safetensors", {"c": torch.zeros(4, 4)})  # its tensors were added to the model's
    with pytest.raises(CheckpointError, match="stray.safetensors: no shard index of the directory names it"):
        open_checkpoint(tmp_path)


def test_a_shard_that_is_a_dangling_link_is_refused_naming_it(tmp_path):
    """A snapshot copied without its blobs leaves links to nothing: the shard was skipped and the model read smaller."""
    save_checkpoint(tmp_path / "a.safetensors", {"a": torch.zeros(4, 4)})
    (tmp_path / "b.safetensors").symlink_to(tmp_path / "blobs" / "gone")
    with pytest.raises(CheckpointError, match=r"b.safetensors: a link to .*gone' that is missing") as e:
        open_checkpoint(tmp_path)
    assert "copy the file it names into place" in e.value.hint
    (tmp_path / "b.safetensors").unlink()
    (tmp_path / "b.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"b.safetensors: is not a file"):
        open_checkpoint(tmp_path)


def test_a_llama_cpp_gguf_beside_the_safetensors_is_one_model_twice_not_shards(tmp_path):
    """A repository with model.safetensors and the model converted to GGUF (blk.0.… names) read as two shards:
    twice the parameters, silently. Shards residency writes (architecture "residency") still mix."""
    save_checkpoint(tmp_path / "model.safetensors", {"model.layers.0.q.weight": torch.zeros(4, 32)})
    w = GGUFWriter(tmp_path / "model-f16.gguf", "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 32), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="GGUF converted for llama.cpp") as e:
        open_checkpoint(tmp_path)
    assert "model.safetensors" in e.value.hint and "model-f16.gguf" in e.value.hint
    with open_checkpoint(tmp_path / "model-f16.gguf") as ck:  # each alone reads
        assert list(ck.entries) == ["blk.0.attn_q.weight"]


def test_two_copies_of_one_model_are_told_to_give_one(tmp_path):
    t = {"w": torch.zeros(4, 32)}
    save_checkpoint(tmp_path / "diffusion_pytorch_model.safetensors", t)
    save_checkpoint(tmp_path / "diffusion_pytorch_model.fp16.safetensors", t, "F16")
    with pytest.raises(CheckpointError, match="also in") as e:
        open_checkpoint(tmp_path)
    assert "two copies of one model" in e.value.hint


def test_a_shard_of_the_series_the_index_misses_names_the_index_not_the_shard_as_wrong(tmp_path):
    # the index put shard 2's tensor in shard 1: shard 2 read as a stray file, and the hint said to move it away,
    # which would lose its weights
    _sharded(tmp_path, {"weight_map": {"a": "model-00001-of-00002.safetensors",
                                       "b": "model-00001-of-00002.safetensors"}})
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: no shard index") as err:
        open_checkpoint(tmp_path)
    assert "same series" in err.value.message
    assert "download the index again" in err.value.hint and "move it out" not in err.value.hint
