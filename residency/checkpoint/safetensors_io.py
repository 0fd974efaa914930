"""safetensors without the safetensors library: parse the header ourselves, write it ourselves.

Parsing by hand lets every lie in a hostile header become a CheckpointError before any
byte range is trusted; quantized blobs travel as U8 plus residency.* metadata.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

from residency.checkpoint.entry import (
    E4M3,
    FORMAT_KEY,
    PACKED,
    SHAPE_KEY,
    TensorEntry,
    check_layout,
    is_reserved_key,
    resolve,
    shape_to_str,
)
from residency.checkpoint.errors import broken
from residency.checkpoint.limits import (
    MAX_NAME_BYTES,
    MAX_TENSORS,
    check_dims,
    check_name,
    check_tensor_count,
    container_nbytes,
    tensor_nbytes,
)
from residency.checkpoint.packing import PackedTensor
from residency.checkpoint.sniff import HEAD_BYTES, SAFETENSORS, content_kind, named_otherwise
from residency.formats import get_format
from residency.validate import a_type

# The header is read into memory whole and parsed by json: ~1 s and ~9× its size in Python
# objects per 16 MiB on a slow core. Real shard headers are a few MB; 16 MiB holds MAX_TENSORS
# entries with ~60-byte names.
HEADER_CAP = 16 * 1024 * 1024
# `{` and `[` cost 60-230 bytes of Python objects each for 1-3 header bytes (`[{},{},…]` is 25×
# its size). A tensor needs one object and two arrays; more containers than that are refused
# by a C-speed count before json builds anything.
_CONTAINERS_PER_TENSOR = 3
_CONTAINER_SLACK = 4096  # braces inside metadata strings (a JSON config stored as text)
_PLAIN = {"F32": "F32", "F16": "F16", "BF16": "BF16"}  # safetensors dtype <-> our format, both ways
_RAW = "U8"


class _Duplicate(Exception):
    def __init__(self, key: str):
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)  # C speed; the slow search runs only when a key repeats
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return out


def _load_header(path: Path, file_size: int) -> tuple[dict[str, object], int]:
    """The JSON header as a dict and the absolute offset where tensor data starts."""
    if file_size < 8:
        raise broken(path, f"file is {file_size} bytes, too short for a safetensors header")
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        if n > file_size - 8 and n > HEADER_CAP:  # no length this file could hold: not a safetensors file
            kind = content_kind(head + f.read(HEAD_BYTES - 8), file_size)
            if kind not in (None, SAFETENSORS):  # a GGUF (its magic reads as a length of ~10^18), JSON, a pickle
                raise broken(path, *named_otherwise(path, kind))
            raise broken(path, f"not a safetensors file: its first 8 bytes ({head.hex(' ')}) say a header of {n} "
                         f"bytes, more than the {HEADER_CAP} residency reads (cap) and than this {file_size}-byte "
                         "file holds",
                         hint="give a .safetensors file (written by safetensors or torch), or check the download")
        if n > HEADER_CAP:
            raise broken(
                path,
                f"header length field says {n} bytes, more than the {HEADER_CAP} residency reads "
                "(cap): corrupt, not a safetensors file, or too many tensors in one file",
                hint="if the file is genuine, split it into shards (a directory of files)",
            )
        if 8 + n > file_size:
            raise broken(
                path, f"header length field says {n} bytes but the file has only {file_size - 8} after it"
            )
        raw = f.read(n)  # n ≤ HEADER_CAP and ≤ file size: a bounded allocation
    if len(raw) != n:
        raise broken(path, "file shrank while its header was being read")
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > _CONTAINERS_PER_TENSOR * MAX_TENSORS + _CONTAINER_SLACK:
        raise broken(path, f"header holds {containers} JSON objects and arrays, more than {MAX_TENSORS} tensors need")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise broken(path, f"header names {e.key!r:.80} twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError, MemoryError) as e:
        raise broken(path, f"header is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(header, dict):
        raise broken(path, f"header is a JSON {type(header).__name__}, not an object")
    return header, 8 + n


def _metadata(path: Path, header: dict[str, object]) -> dict[str, str]:
    meta = header.pop("__metadata__", None)
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise broken(path, "__metadata__ is not a JSON object")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise broken(path, f"__metadata__[{key!r:.80}] is {a_type(value)}, not a string")
    return meta


def _offsets(path: Path, name: str, offsets: object) -> tuple[int, int]:
    if type(offsets) is list and len(offsets) == 2:
        begin, end = offsets
        if type(begin) is int and type(end) is int and 0 <= begin <= end:  # `type`: True is not an offset
            return begin, end
    raise broken(
        path, f"tensor {name!r:.80}: data_offsets {offsets!r:.80} are not two integers 0 ≤ begin ≤ end"
    )


def _resolve(
    path: Path, name: str, dtype: str, stored_shape: tuple[int, ...], nbytes: int, overrides: Mapping[str, str]
) -> tuple[str, tuple[int, ...], str]:
    """(format name, torch shape, encoding) of one header entry, every size checked."""
    if dtype == "F8_E4M3" and FORMAT_KEY + name not in overrides:
        # Raw e4m3 (e.g. fp8 exports): our FP8 with every row scale 1.0, one byte per weight.
        tensor_nbytes(path, name, get_format("FP8"), stored_shape, nbytes, one_byte_per_weight=True)
        return "FP8", stored_shape, E4M3
    if dtype == _RAW and container_nbytes(path, name, stored_shape, 1, 1) != nbytes:
        raise broken(path, f"tensor {name!r:.80}: U8 {stored_shape} is not {nbytes} bytes")
    base = get_format(_PLAIN[dtype]) if dtype in _PLAIN else None
    fmt_name, shape = resolve(path, name, base, stored_shape, nbytes, overrides, dtype == _RAW, dtype)
    return fmt_name, shape, PACKED


# Dtypes a checkpoint holds beside weights (position ids, masks, step counters, a float64 table): not weights
# residency stores, streams or quantizes. Listed apart (left_out), their byte ranges still checked.
OTHER_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "BOOL": 1, "F64": 8,
                "F8_E5M2": 1}


def read_safetensors(path: Path, file_size: int) -> tuple[list[TensorEntry], dict[str, str], list[LeftOut]]:
    """Entries (in data order), user metadata and the tensors left out of one .safetensors file: those of
    OTHER_DTYPES, and U8 that no residency.format key claims."""
    header, data_start = _load_header(path, file_size)
    meta = _metadata(path, header)
    overrides = {k: v for k, v in meta.items() if is_reserved_key(k)}
    check_tensor_count(path, len(header))
    entries: list[TensorEntry] = []
    others: list[LeftOut] = []
    # A model repeats a few (dtype, shape) pairs thousands of times: resolve each pair once.
    # Tensors named by residency.* keys are resolved on their own.
    seen: dict[tuple, tuple[str, tuple[int, ...], str]] = {}
    # The hot loop of a file with many tensors (~2.5 µs an entry): the common case checked inline, the
    # helpers (and their error text) reached only when a check fails.
    for name, info in header.items():
        if not name or len(name) > MAX_NAME_BYTES or not name.isprintable():  # the fast test, per tensor
            check_name(path, name)
        if type(info) is not dict:
            raise broken(path, f"tensor {name!r:.80}: header entry is not a JSON object")
        dtype = info.get("dtype")
        if type(dtype) is not str:
            raise broken(path, f"tensor {name!r:.80}: dtype {dtype!r:.40} is not a string")
        offsets = info.get("data_offsets")
        if type(offsets) is list and len(offsets) == 2 and type(offsets[0]) is int and type(offsets[1]) is int \
                and 0 <= offsets[0] <= offsets[1]:  # `type`: True is not an offset
            begin, end = offsets
        else:
            begin, end = _offsets(path, name, offsets)
        nbytes = end - begin
        if data_start + end > file_size:
            raise broken(
                path, f"tensor {name!r:.80}: data_offsets end at {end}, past the end of the data section"
            )
        stored_shape = check_dims(path, name, info.get("shape"))  # ints only: safe as a dict key
        named = bool(overrides) and (FORMAT_KEY + name in overrides or SHAPE_KEY + name in overrides)
        if dtype in OTHER_DTYPES or (dtype == _RAW and not named):
            width = OTHER_DTYPES.get(dtype, 1)
            if container_nbytes(path, name, stored_shape, 1, width) != nbytes:
                raise broken(path, f"tensor {name!r:.80}: {dtype} {stored_shape} is not {nbytes} bytes")
            others.append(LeftOut(name, dtype, stored_shape, nbytes, data_start + begin))
            continue
        key = (dtype, stored_shape, nbytes)
        resolved = None if named else seen.get(key)
        if resolved is None:
            resolved = _resolve(path, name, dtype, stored_shape, nbytes, overrides)
            if not named:
                seen[key] = resolved
        fmt_name, shape, encoding = resolved
        entries.append(TensorEntry(name, shape, fmt_name, nbytes, path, data_start + begin, encoding))
    entries.sort(key=lambda e: e.offset)  # stable: ties keep header order
    # the left-out tensors' ranges are checked with the others' (no overlap, inside the data section)
    every = [*entries, *(TensorEntry(o.name, o.shape, "BF16", o.nbytes, path, o.offset) for o in others)]
    check_layout(path, every, data_start, file_size)
    _check_covered(path, every, data_start, file_size)
    return entries, {k: v for k, v in meta.items() if not is_reserved_key(k)}, others


def _check_covered(path: Path, entries: Sequence[TensorEntry], data_start: int, file_size: int) -> None:
    """The data section is the tensors back to back, as the format requires and its reference reader checks (it
    refuses a gap, "invalid offset", and bytes after the last tensor, "not fully covered"): a file it would not
    load is not read as a model here either."""
    at = data_start
    for start, end, name in sorted((e.offset, e.offset + e.nbytes, e.name) for e in entries):
        if start != at:
            what = "a gap" if start > at else "inside the tensor before it"
            raise broken(path, f"tensor {name!r:.80} starts at byte {start - data_start} of the data section, not at "
                               f"{at - data_start} where the tensor before it ends: {what}, which the format does not "
                               "allow")
        at = end
    if at != file_size:
        raise broken(path, f"{file_size - at} bytes after the last tensor: the data section must hold the tensors only")


class LeftOut(NamedTuple):
    """A tensor of a dtype residency does not store (OTHER_DTYPES): named, shown, never read."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int



def write_safetensors(
    f: BinaryIO, tensors: Sequence[PackedTensor], metadata: Mapping[str, str], target: Path
) -> None:
    """Header then data, in the given order; F32/F16/BF16 keep their dtype, others go as U8.

    `target` is the path errors name (`f` is usually a temp file beside it).
    """
    meta = dict(metadata)
    header: dict[str, object] = {}
    offset = 0
    for t in tensors:
        n = t.data.numel()
        if t.format in _PLAIN:
            dtype, shape = _PLAIN[t.format], list(t.shape)
        else:
            dtype, shape = _RAW, [n]
            meta[FORMAT_KEY + t.name] = t.format
            meta[SHAPE_KEY + t.name] = shape_to_str(t.shape)
        header[t.name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    if meta:
        header = {"__metadata__": meta, **header}
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    if len(blob) > HEADER_CAP or len(tensors) > MAX_TENSORS:
        # Never write a file that open_checkpoint would refuse.
        raise broken(
            target,
            f"{len(tensors)} tensors make a {len(blob)}-byte header; one file holds at most "
            f"{MAX_TENSORS} tensors and a {HEADER_CAP}-byte header",
            hint="save the tensors as several shards in one directory",
        )
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for t in tensors:
        f.write(t.data.numpy())  # buffer protocol: no extra host copy
