"""safetensors without the safetensors library: parse the header ourselves, write it ourselves.

Parsing by hand lets every lie in a hostile header become a CheckpointError before any
byte range is trusted; quantized blobs travel as U8 plus residency.* metadata.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from residency.checkpoint.entry import (
    E4M3,
    FORMAT_KEY,
    SHAPE_KEY,
    TensorEntry,
    check_layout,
    check_shape,
    is_reserved_key,
    resolve,
    shape_to_str,
)
from residency.checkpoint.errors import broken
from residency.checkpoint.packing import PackedTensor
from residency.formats import get_format

# The header is read into memory whole: cap it before trusting the length field.
HEADER_CAP = 100 * 1024 * 1024
_PLAIN = {"F32": "F32", "F16": "F16", "BF16": "BF16"}  # safetensors dtype <-> our format, both ways
_RAW = "U8"


class _Duplicate(Exception):
    def __init__(self, key: str):
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _load_header(path: Path, file_size: int) -> tuple[dict[str, object], int]:
    """The JSON header as a dict and the absolute offset where tensor data starts."""
    if file_size < 8:
        raise broken(path, f"file is {file_size} bytes, too short for a safetensors header")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > HEADER_CAP:
            raise broken(
                path, f"header length field says {n} bytes (cap {HEADER_CAP}): not a safetensors file"
            )
        if 8 + n > file_size:
            raise broken(
                path, f"header length field says {n} bytes but the file has only {file_size - 8} after it"
            )
        raw = f.read(n)  # n ≤ HEADER_CAP and ≤ file size: a bounded allocation
    if len(raw) != n:
        raise broken(path, "file shrank while its header was being read")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise broken(path, f"header names {e.key!r:.80} twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
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
            raise broken(path, f"__metadata__[{key!r:.80}] is a {type(value).__name__}, not a string")
    return meta


def _offsets(path: Path, name: str, offsets: object) -> tuple[int, int]:
    ok = isinstance(offsets, list) and len(offsets) == 2
    ok = ok and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)  # type: ignore[union-attr]
    if not ok or not 0 <= offsets[0] <= offsets[1]:  # type: ignore[index]
        raise broken(
            path, f"tensor {name!r:.80}: data_offsets {offsets!r:.80} are not two integers 0 ≤ begin ≤ end"
        )
    return offsets[0], offsets[1]  # type: ignore[index]


def read_safetensors(path: Path, file_size: int) -> tuple[list[TensorEntry], dict[str, str]]:
    """Entries (in data order) and user metadata of one .safetensors file."""
    header, data_start = _load_header(path, file_size)
    meta = _metadata(path, header)
    overrides = {k: v for k, v in meta.items() if is_reserved_key(k)}
    entries: list[TensorEntry] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise broken(path, f"tensor {name!r:.80}: header entry is not a JSON object")
        dtype = info.get("dtype")
        if not isinstance(dtype, str):
            raise broken(path, f"tensor {name!r:.80}: dtype {dtype!r:.40} is not a string")
        stored_shape = check_shape(path, name, info.get("shape"))
        begin, end = _offsets(path, name, info.get("data_offsets"))
        nbytes = end - begin
        if data_start + end > file_size:
            raise broken(
                path, f"tensor {name!r:.80}: data_offsets end at {end}, past the end of the data section"
            )
        encoding = "packed"
        if dtype == "F8_E4M3" and FORMAT_KEY + name not in overrides:
            # Raw e4m3 (e.g. fp8 exports): our FP8 with every row scale 1.0, one byte per weight.
            if math.prod(stored_shape) != nbytes:
                raise broken(path, f"tensor {name!r:.80}: F8_E4M3 {stored_shape} is not {nbytes} bytes")
            fmt_name, shape, encoding = "FP8", stored_shape, E4M3
        else:
            if dtype == _RAW and math.prod(stored_shape) != nbytes:
                raise broken(path, f"tensor {name!r:.80}: U8 {stored_shape} is not {nbytes} bytes")
            base = get_format(_PLAIN[dtype]) if dtype in _PLAIN else None
            fmt_name, shape = resolve(path, name, base, stored_shape, nbytes, overrides, dtype == _RAW, dtype)
        entries.append(TensorEntry(name, shape, fmt_name, nbytes, path, data_start + begin, encoding))
    entries.sort(key=lambda e: e.offset)  # stable: ties keep header order
    check_layout(path, entries, data_start, file_size)
    return entries, {k: v for k, v in meta.items() if not is_reserved_key(k)}


def write_safetensors(f: BinaryIO, tensors: Sequence[PackedTensor], metadata: Mapping[str, str]) -> None:
    """Header then data, in the given order; F32/F16/BF16 keep their dtype, others go as U8."""
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
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for t in tensors:
        f.write(t.data.numpy())  # buffer protocol: no extra host copy
