"""Hostile checkpoint files: seeded mutations of small valid .safetensors and .gguf files.

Used by tests/test_checkpoint_generated.py (a sample) and tools/bench_hostile.py (hundreds, each
in a subprocess). The same seed always gives the same bytes. Every case is either refused with a
CheckpointError or reads cleanly; anything else from `open_checkpoint` or `residency inspect` is a bug.
"""

from __future__ import annotations

import json
import random
import struct
import tempfile
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

SAFETENSORS, GGUF = ".safetensors", ".gguf"
# GGUF value types and ggml tensor types used below.
UINT8, UINT32, INT32, FLOAT32, STRING, ARRAY, UINT64 = 0, 4, 5, 6, 8, 9, 10
F32_T, Q8_0_T, I8_T = 0, 8, 24
BOMB_BYTES = 2 * 1024 * 1024  # size of the amplification cases: big enough to show a per-byte cost


@cache
def valid_file(suffix: str) -> bytes:
    """A small valid checkpoint written by residency's own writer: F32, Q8_0, FP8 and a scalar."""
    import torch

    from residency.checkpoint import save_checkpoint

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "blk.0.w": torch.randn(4, 64, generator=gen),
        "blk.0.norm": torch.randn(64, generator=gen),
        "blk.1.w": torch.randn(2, 32, generator=gen),
        "scale": torch.randn((), generator=gen),
    }
    formats = {"blk.0.w": "Q8_0", "blk.1.w": "FP8"}
    with tempfile.TemporaryDirectory() as d:
        return save_checkpoint(Path(d) / f"valid{suffix}", tensors, formats, {"note": "hostile base"}).read_bytes()


# --- safetensors ----------------------------------------------------------------------------
def st_file(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file: the 8-byte little-endian header length, the header, then `data`.

    header: a dict (JSON-encoded here) or raw header bytes. length: the header length to write, in bytes;
    None writes the true one, anything else is a lie.
    """
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def _st_split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _st_tensor(rng: random.Random, header: dict) -> str:
    return rng.choice(sorted(k for k in header if k != "__metadata__"))


@cache
def _st_many_entries_lie() -> bytes:
    n = BOMB_BYTES // 64
    entry = '{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    body = ",".join(f'"blk.{i}.w":{entry}' for i in range(n))
    return st_file(f'{{{body},"last":{{"dtype":"F32","shape":[{2**40}],"data_offsets":[0,0]}}}}'.encode(), b"")


def _st_edit(fn: Callable[[random.Random, dict], object]) -> Callable[[random.Random], bytes]:
    """A mutation that lets `fn(rng, header)` edit the valid file's parsed header in place, then re-encodes it."""

    def make(rng: random.Random) -> bytes:
        header, data = _st_split(valid_file(SAFETENSORS))
        fn(rng, header)
        return st_file(header, data)

    return make


def _st_set_field(field: str, values: Callable[[random.Random], object]) -> Callable[[random.Random], bytes]:
    """A mutation that sets `field` of one randomly chosen tensor entry to `values(rng)`."""
    return _st_edit(lambda rng, h: h[_st_tensor(rng, h)].__setitem__(field, values(rng)))


_ST_HUGE_DIMS = [2**31, 2**32 + 1, 2**48 + 1, 2**63, 2**64 - 1, 2**64, 2**80]


def _st_truncate(rng: random.Random) -> bytes:
    return valid_file(SAFETENSORS)[: rng.randrange(len(valid_file(SAFETENSORS)))]


def _st_f8_rows_zero(rng: random.Random) -> bytes:  # raw FP8 [rows, 0]: 0 stored bytes, rows × 4 on read
    rows = rng.choice([2**28, 2**36, 2**40])
    return st_file({"w": {"dtype": "F8_E4M3", "shape": [rows, 0], "data_offsets": [0, 0]}}, b"")


def _st_zero_then_huge(rng: random.Random) -> bytes:
    dtype = rng.choice(["F32", "BF16", "F8_E4M3"])
    shape = rng.choice([[0, 2**63], [0, 2**64 - 1], [2**63, 0], [0, 2**40, 2**40], [0] + [2**62] * 3])
    return st_file({"w": {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}}, b"")


def _st_length_lies(rng: random.Random) -> bytes:
    blob = bytearray(valid_file(SAFETENSORS))
    (n,) = struct.unpack_from("<Q", blob)
    lie = rng.choice([0, 1, n - 1, n + 1, n + 7, len(blob), 2**31, 2**63, 2**64 - 1, 16 * 2**20])
    struct.pack_into("<Q", blob, 0, lie)
    return bytes(blob)


def _st_flip_header(rng: random.Random) -> bytes:
    blob = bytearray(valid_file(SAFETENSORS))
    (n,) = struct.unpack_from("<Q", blob)
    for _ in range(rng.randint(1, 8)):
        blob[rng.randrange(8, 8 + n)] = rng.randrange(256)
    return bytes(blob)


def _st_duplicate(rng: random.Random) -> bytes:
    entry = json.dumps({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})
    return st_file(f'{{"w":{entry},"w":{entry}}}'.encode(), bytes(8))


def _st_deep(rng: random.Random) -> bytes:
    depth = rng.choice([1_000, 100_000, 1_000_000])
    inner = "[" * depth + "]" * depth
    return st_file(f'{{"w":{{"dtype":"F32","shape":{inner},"data_offsets":[0,0]}}}}'.encode(), b"")


def _st_huge_int(rng: random.Random) -> bytes:
    digits = "9" * rng.choice([4_301, 50_000, 1_000_000])
    where = rng.choice(["shape", "offsets"])
    body = f"[{digits}]" if where == "shape" else f"[0,{digits}]"
    key = "shape" if where == "shape" else "data_offsets"
    other = '"data_offsets":[0,0]' if where == "shape" else '"shape":[1]'
    return st_file(f'{{"w":{{"dtype":"F32","{key}":{body},{other}}}}}'.encode(), b"")


def _st_container_bomb(rng: random.Random) -> bytes:
    unit = rng.choice([b"{},", b"[],", b'{"a":{}},', b"[[]],"])
    inner = unit * (BOMB_BYTES // len(unit))
    return st_file(b'{"__metadata__":{"a":"b"},"x":[' + inner[:-1] + b"]}", b"")


def _st_many_entries(rng: random.Random) -> bytes:  # a valid-looking header with one lie at its end
    return _st_many_entries_lie()


def _st_metadata_wrong(rng: random.Random) -> bytes:
    value = rng.choice([1, 1.5, None, [], {}, True, ["a"], {"a": "b"}])
    return _st_edit(lambda r, h: h.__setitem__("__metadata__", {"k": value} if r.random() < 0.7 else value))(rng)


def _st_shape_meta_wrong(rng: random.Random) -> bytes:
    text = rng.choice(["", "x", "-1", "0," + str(2**63), ",".join(["1"] * 40), "1" * 5000, "2,64,", "1e3"])
    return _st_edit(lambda r, h: h["__metadata__"].__setitem__("residency.shape.blk.0.w", text))(rng)


def _st_long_name(rng: random.Random) -> bytes:
    name = "n" * rng.choice([5_000, 1_000_000])
    return st_file({name: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))


def _st_mutations() -> dict[str, Callable[[random.Random], bytes]]:
    # The key order fixes which class each case index gets (hostile_cases cycles through it): keep it.
    return {
        "truncate": _st_truncate,
        "flip_header": _st_flip_header,
        "length_lies": _st_length_lies,
        "dims_huge": _st_set_field("shape", lambda rng: [rng.choice(_ST_HUGE_DIMS), rng.choice([1, 2, 0])]),
        "dims_negative": _st_set_field("shape", lambda rng: [rng.choice([-1, -(2**63)]), 4]),
        "dims_zero": _st_set_field("shape", lambda rng: rng.choice([[0], [0, 64], [4, 0], []])),
        "dims_not_ints": _st_set_field("shape", lambda rng: rng.choice([[1.5], ["4"], [True], None, "4,4", [[4]]])),
        "dims_count_huge": _st_set_field("shape", lambda rng: [1] * rng.choice([33, 1_000, 100_000])),
        "zero_then_huge": _st_zero_then_huge,
        "f8_rows_zero": _st_f8_rows_zero,
        "offsets_out_of_range": _st_set_field(
            "data_offsets", lambda rng: rng.choice([[0, 2**40], [2**63, 2**63 + 8], [0, 2**64], [10**6, 10**6 + 8]])
        ),
        "offsets_overlap": _st_edit(lambda rng, h: [v.__setitem__("data_offsets", [0, 4]) for k, v in h.items() if k != "__metadata__"]),
        "offsets_malformed": _st_set_field("data_offsets", lambda rng: rng.choice([[8, 0], [-8, 0], [0], [0, 1, 2], "0,8", [0.0, 8]])),
        "dtype_unknown": _st_set_field("dtype", lambda rng: rng.choice(["Q9", "I64", "BOOL", "F64", "U8", "", 5, None])),
        "duplicate_names": _st_duplicate,
        "deep_json": _st_deep,
        "huge_int": _st_huge_int,
        "container_bomb": _st_container_bomb,
        "many_entries": _st_many_entries,
        "metadata_wrong_type": _st_metadata_wrong,
        "shape_meta_wrong": _st_shape_meta_wrong,
        "long_name": _st_long_name,
    }


# --- GGUF -----------------------------------------------------------------------------------
def gguf_str(s: str | bytes, length: int | None = None) -> bytes:
    """A GGUF string: its u64 byte length, then its UTF-8 bytes. length: the length to write, in bytes;
    None writes the true one, anything else is a lie."""
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b) if length is None else length) + b


def gguf_file(kvs=(), tensors=(), data=b"", version=3, counts=None, align=32) -> bytes:
    """A GGUF file by hand: kvs are (key, type, payload bytes), tensors (name, ggml dims, type, offset)."""
    n_t, n_kv = counts if counts is not None else (len(tensors), len(kvs))
    parts = [b"GGUF", struct.pack("<IQQ", version, n_t, n_kv)]
    for key, vtype, payload in kvs:
        parts += [gguf_str(key), struct.pack("<I", vtype), payload]
    for name, dims, ttype, offset in tensors:
        parts += [gguf_str(name), struct.pack(f"<I{len(dims)}Q", len(dims), *dims), struct.pack("<IQ", ttype, offset)]
    out = b"".join(parts)
    return out + bytes(-len(out) % align) + data


_BASE_KVS = [("general.architecture", STRING, gguf_str("residency")), ("note", STRING, gguf_str("hostile base"))]
_BASE_TENSORS = [("w", [4, 2], F32_T, 0), ("q", [32, 2], Q8_0_T, 32)]  # 32 + 68 bytes of data
_BASE_DATA = struct.pack("<8f", *range(8)) + bytes(68)


@cache
def _gguf_many_tensors_lie() -> bytes:
    n = BOMB_BYTES // 40
    return gguf_file(_BASE_KVS, [(f"blk.{i}.w", [0], F32_T, 0) for i in range(n)] + [("last", [2**40], F32_T, 0)])


def _gguf_tensor(rng: random.Random, **change) -> bytes:
    """The base GGUF file with one randomly chosen tensor's name, dims, ttype or offset replaced by `change`."""
    tensors = list(_BASE_TENSORS)
    i = rng.randrange(len(tensors))
    name, dims, ttype, offset = tensors[i]
    tensors[i] = (change.get("name", name), change.get("dims", dims), change.get("ttype", ttype), change.get("offset", offset))
    return gguf_file(_BASE_KVS, tensors, _BASE_DATA)


def _gguf_kv(rng: random.Random, key: str, vtype: int, payload: bytes) -> bytes:
    """The base GGUF file with one extra key-value pair (value type `vtype`, raw `payload` bytes) appended."""
    return gguf_file([*_BASE_KVS, (key, vtype, payload)], _BASE_TENSORS, _BASE_DATA)


_GGUF_HUGE_DIMS = [2**32, 2**48 + 1, 2**62, 2**63, 2**64 - 1]


def _gguf_truncate(rng: random.Random) -> bytes:
    return valid_file(GGUF)[: rng.randrange(len(valid_file(GGUF)))]


def _gguf_flip_header(rng: random.Random) -> bytes:
    blob = bytearray(valid_file(GGUF))
    end = min(len(blob), 512)
    for _ in range(rng.randint(1, 8)):
        blob[rng.randrange(4, end)] = rng.randrange(256)
    return bytes(blob)


def _gguf_counts_lie(rng: random.Random) -> bytes:
    n_t = rng.choice([0, 1, 3, 1_000, 2**20, 2**40, 2**64 - 1])
    n_kv = rng.choice([0, 1, 3, 1_000, 2**20, 2**40, 2**64 - 1])
    return gguf_file(_BASE_KVS, _BASE_TENSORS, _BASE_DATA, counts=(n_t, n_kv))


def _gguf_string_lies(rng: random.Random) -> bytes:
    lie = rng.choice([2**16, 2**31, 2**63, 2**64 - 1, 200])
    return _gguf_kv(rng, "text", STRING, gguf_str("short", length=lie))


def _gguf_array_lies(rng: random.Random) -> bytes:
    sub = rng.choice([UINT8, UINT32, STRING, ARRAY])
    count = rng.choice([2**20, 2**32, 2**60, 2**64 - 1])
    return _gguf_kv(rng, "arr", ARRAY, struct.pack("<IQ", sub, count) + bytes(16))


def _gguf_string_array_walk(rng: random.Random) -> bytes:  # many empty strings: the walk is one step per item
    count = BOMB_BYTES // 8
    return _gguf_kv(rng, "tokens", ARRAY, struct.pack("<IQ", STRING, count) + bytes(8 * count))


def _gguf_nested_arrays(rng: random.Random) -> bytes:
    depth = rng.choice([4, 64, 10_000])
    return _gguf_kv(rng, "nest", ARRAY, struct.pack("<IQ", ARRAY, 1) * depth + struct.pack("<IQ", UINT8, 0))


def _gguf_value_type_wrong(rng: random.Random) -> bytes:
    key = rng.choice(["general.alignment", "residency.format.w", "residency.shape.q"])
    vtype, payload = rng.choice([(STRING, gguf_str("32")), (UINT64, struct.pack("<Q", 32)), (FLOAT32, struct.pack("<f", 32)),
                                 (INT32, struct.pack("<i", -32)), (77, bytes(8))])
    return _gguf_kv(rng, key, vtype, payload)


def _gguf_alignment_bad(rng: random.Random) -> bytes:
    value = rng.choice([0, 3, 48, 2**17, 2**31, 2**32 - 1])
    return _gguf_kv(rng, "general.alignment", UINT32, struct.pack("<I", value))


def _gguf_duplicate(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return gguf_file(_BASE_KVS, [_BASE_TENSORS[0], ("w", [4, 2], F32_T, 32)], _BASE_DATA)
    return gguf_file([*_BASE_KVS, _BASE_KVS[1]], _BASE_TENSORS, _BASE_DATA)


def _gguf_long_name(rng: random.Random) -> bytes:
    return _gguf_tensor(rng, name="n" * rng.choice([5_000, 1_000_000]))


def _gguf_many_tensors(rng: random.Random) -> bytes:  # a valid-looking table with one lie at its end
    return _gguf_many_tensors_lie()


def _gguf_offset_overlap(rng: random.Random) -> bytes:
    return gguf_file(_BASE_KVS, [_BASE_TENSORS[0], ("q", [32, 2], Q8_0_T, rng.choice([0, 32, 64]))], _BASE_DATA[:32])


def _gguf_mutations() -> dict[str, Callable[[random.Random], bytes]]:
    # The key order fixes which class each case index gets (hostile_cases cycles through it): keep it.
    return {
        "truncate": _gguf_truncate,
        "flip_header": _gguf_flip_header,
        "counts_lie": _gguf_counts_lie,
        "string_length_lies": _gguf_string_lies,
        "array_count_lies": _gguf_array_lies,
        "string_array_walk": _gguf_string_array_walk,
        "nested_arrays": _gguf_nested_arrays,
        "value_type_wrong": _gguf_value_type_wrong,
        "alignment_bad": _gguf_alignment_bad,
        "dims_huge": lambda rng: _gguf_tensor(rng, dims=[rng.choice(_GGUF_HUGE_DIMS), rng.choice([1, 2, 2**20])]),
        "dims_zero": lambda rng: _gguf_tensor(rng, dims=rng.choice([[0], [32, 0], [0, 2**63], [0, 2**64 - 1], [2**63, 0, 2**63]])),
        "dims_count_huge": lambda rng: _gguf_tensor(rng, dims=[1] * rng.choice([33, 1_000])),
        "offset_out_of_range": lambda rng: _gguf_tensor(rng, offset=rng.choice([2**20, 2**63, 2**64 - 32, 96])),
        "offset_overlap": _gguf_offset_overlap,
        "offset_unaligned": lambda rng: _gguf_tensor(rng, offset=rng.choice([1, 4, 8, 16, 33])),
        "type_unknown": lambda rng: _gguf_tensor(rng, ttype=rng.choice([4, 5, 31, 40, 999, 2**32 - 1])),
        # an integer tensor (or I8 no residency key names) is left out, listed apart: its bytes are still checked
        "type_left_out_past_end": lambda rng: _gguf_tensor(rng, ttype=rng.choice([I8_T, 26]), dims=[2**20]),
        "duplicate_names": _gguf_duplicate,
        "long_name": _gguf_long_name,
        "many_tensors_lie": _gguf_many_tensors,
    }


MUTATIONS: dict[str, dict[str, Callable[[random.Random], bytes]]] = {
    SAFETENSORS: _st_mutations(),
    GGUF: _gguf_mutations(),
}


def hostile_cases(seed: int, count: int) -> Iterator[tuple[str, str, bytes]]:
    """`count` cases as (name, suffix, bytes), cycling through every mutation class of both containers.

    The first 2 × len(classes) cases cover each class once; later ones draw new random parameters.
    """
    rng = random.Random(seed)
    classes = [(suffix, name) for suffix, table in MUTATIONS.items() for name in table]
    for i in range(count):
        suffix, name = classes[i % len(classes)]
        case_rng = random.Random(rng.getrandbits(64))
        yield f"{i:04d}-{suffix[1:]}-{name}", suffix, MUTATIONS[suffix][name](case_rng)


def worst_header_file(kind: str) -> bytes:
    """The costliest header a reader accepts to parse: as many valid-looking entries as the caps allow
    (MAX_TENSORS, and for safetensors HEADER_CAP bytes), then one lie in the last entry. Its cost is what
    any hostile file can cost, since nothing before the lie tells it from a genuine file."""
    from residency.checkpoint.limits import MAX_TENSORS
    from residency.checkpoint.safetensors_io import HEADER_CAP

    last = f'"last":{{"dtype":"F32","shape":[{2**40}],"data_offsets":[0,0]}}'
    if kind in ("safetensors", SAFETENSORS):
        entries, size = [], len(last) + 2
        for i in range(MAX_TENSORS - 1):
            entry = f'"blk.{i}.w":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
            if size + len(entry) + 1 > HEADER_CAP:
                break
            entries.append(entry)
            size += len(entry) + 1
        return st_file(("{" + ",".join([*entries, last]) + "}").encode(), b"")
    if kind in ("gguf", GGUF):
        tensors = [(f"blk.{i}.w", [0], F32_T, 0) for i in range(MAX_TENSORS - 1)]
        return gguf_file(_BASE_KVS, [*tensors, ("last", [2**40], F32_T, 0)])
    raise ValueError(f"kind must be 'safetensors' or 'gguf', not {kind!r}")


def many_tensors_file(n: int, kind: str, same_shape: bool = False) -> bytes:
    """A valid file of `n` zero-size F32 tensors named like a model's (`blocks.<i>.attn.w`): the
    `inspect` stress case. By default every shape differs ([0, i+1]), so no two blocks look alike
    and no per-shape cache helps: the worst case for reading, grouping and drawing. same_shape:
    every tensor is [0], as `torch.zeros(0)` saved 200,000 times would be."""
    names = [f"blocks.{i // 4}.{('attn', 'mlp', 'norm', 'proj')[i % 4]}.w" for i in range(n)]
    cols = [0 if same_shape else i + 1 for i in range(n)]
    if kind in ("safetensors", SAFETENSORS):
        shapes = ["[0]" if same_shape else f"[0,{c}]" for c in cols]
        body = ",".join(f'"{name}":{{"dtype":"F32","shape":{shape},"data_offsets":[0,0]}}' for name, shape in zip(names, shapes, strict=True))
        return st_file(f"{{{body}}}".encode(), b"")
    if kind in ("gguf", GGUF):
        return gguf_file([], [(name, [0] if same_shape else [c, 0], F32_T, 0) for name, c in zip(names, cols, strict=True)])
    raise ValueError(f"kind must be 'safetensors' or 'gguf', not {kind!r}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="write hostile checkpoint files into a directory")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for case_name, case_suffix, blob in hostile_cases(args.seed, args.count):
        (args.out / f"{case_name}{case_suffix}").write_bytes(blob)
    print(f"wrote {args.count} files to {args.out}")
