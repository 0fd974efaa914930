"""A bounded GGUF header parser over a memory map: metadata as text, tensor infos, data offset.

gguf.GGUFReader trusts its counts (an array length of 2^60 makes it loop forever) and builds
a numpy object per array item (1.3M tokenizer items: 18 s, 1 GB). This parser checks every
count and length against the bytes really present, skips long arrays in O(1) (scalars)
or one pass (strings), and allocates nothing sized by an unchecked field.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from residency.checkpoint.errors import BROKEN_HINT, broken
from residency.checkpoint.limits import MAX_NAME_BYTES, MAX_TENSORS, check_name, check_tensor_count
from residency.checkpoint.sniff import HEAD_BYTES, content_kind, named_otherwise

# GGUFValueType → struct code; 8 = STRING, 9 = ARRAY.
_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
STRING, ARRAY, UINT32, FLOAT32 = 8, 9, 4, 6
_MIN_SIZE = {**{t: struct.calcsize(c) for t, c in _SCALAR.items()}, STRING: 8, ARRAY: 12}
MAX_ARRAY_TEXT = 64  # arrays up to this many scalars/strings become JSON text; longer ones are skipped
# String/nested-array items walked one by one, in total: ~0.3 µs each, so ≤ ~1 s per file.
# Real tokenizers hold 32k-262k tokens plus up to ~500k merges.
MAX_WALK_ITEMS = 4_000_000
MAX_ARRAY_DEPTH = 3
# Metadata keys per file: real GGUFs have 20-60 (our own writer adds 2 per FP8/NF4 tensor);
# each costs ~250 bytes of Python objects for ≥ 13 header bytes.
MAX_METADATA_KEYS = 2 * MAX_TENSORS + 4096
SUPPORTED_VERSIONS = (2, 3)
PLAUSIBLE_GGUF_VERSION = 255  # GGUF went 1, 2, 3 in two years: a version field past this is damage, not the future
DEFAULT_ALIGNMENT = 32
# A metadata string decoded whole (general.name, a chat template: kilobytes): the safetensors reader's header cap
MAX_STRING_BYTES = 16 * 1024 * 1024
GGML_MAX_DIMS = 4  # ggml.h; llama.cpp's gguf reader refuses a tensor of more
MAX_ALIGNMENT = 1 << 16  # llama.cpp writes 32; anything past a large page is a lie


class GGUFTensorInfo(NamedTuple):
    """One entry of a GGUF tensor table (a NamedTuple: one per entry, and a frozen dataclass's init costs ~1 µs)."""

    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the fastest-varying (torch's last) dimension
    ggml_type: int
    offset: int  # relative to GGUFHeader.data_offset


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    fields: dict[str, tuple[int, str | None]]  # key → (GGUFValueType, text; None for skipped arrays)
    tensors: list[GGUFTensorInfo]
    alignment: int
    data_offset: int  # absolute start of the tensor data section


class _Cursor:
    def __init__(self, path: Path, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0
        self.walked = 0

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise broken(
                self.path, f"truncated GGUF header: {what} at byte {self.pos} runs past the end of the file"
            )
        start = self.pos
        self.pos += n
        return start

    def unpack(self, code: str, what: str):
        return struct.unpack_from(code, self.buf, self.take(struct.calcsize(code), what))[0]

    def string(self, what: str, decode: bool = True, limit: int = MAX_STRING_BYTES) -> str | None:
        """One string: decoded (at most `limit` bytes, refused before anything is decoded: a 512 MiB name in a
        sparse 8 KB file took 1.8 GB of memory) or skipped (mapped, never read: no cost)."""
        n = self.unpack("<Q", what + " length")
        if decode and n > limit:
            raise broken(self.path, f"GGUF {what} is {n} bytes long, more than the {limit} residency reads",
                         hint="a file not written by a GGUF writer is damaged: write it again")
        start = self.take(n, what)
        if not decode:
            return None
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise broken(self.path, f"GGUF {what} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0, keep: bool = True) -> object:
        """Read (keep=True) or skip one value; skipped and over-long arrays return None."""
        if vtype in _SCALAR:
            if not keep:
                self.take(_MIN_SIZE[vtype], what)
                return None
            return self.unpack(_SCALAR[vtype], what)
        if vtype == STRING:
            return self.string(what, decode=keep)
        if vtype != ARRAY:
            raise broken(self.path, f"GGUF {what} has unknown value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            raise broken(self.path, f"GGUF {what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        sub = self.unpack("<I", what + " item type")
        count = self.unpack("<Q", what + " length")
        if sub not in _MIN_SIZE:
            raise broken(self.path, f"GGUF {what} has unknown item type {sub}")
        if count * _MIN_SIZE[sub] > self.size - self.pos:
            raise broken(self.path, f"GGUF {what} claims {count} items, more than the file can hold")
        keep = keep and depth == 0 and sub != ARRAY and count <= MAX_ARRAY_TEXT
        if sub in _SCALAR and not keep:
            self.take(count * _MIN_SIZE[sub], what)  # skipped in O(1)
            return None
        if not keep:
            self.walked += count
            if self.walked > MAX_WALK_ITEMS:
                raise broken(
                    self.path, f"GGUF metadata arrays hold more than {MAX_WALK_ITEMS} strings in total"
                )
            if sub == STRING:
                self._skip_strings(count, what)
                return None
        items = [self.value(sub, what, depth + 1, keep) for _ in range(count)]
        return items if keep else None

    def _skip_strings(self, count: int, what: str) -> None:
        # The hot loop of tokenizer tables (one iteration per token): locals only, no calls but unpack.
        buf, size, pos, unpack = self.buf, self.size, self.pos, struct.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                break
            pos += 8 + unpack("<Q", buf, pos)[0]
            if pos > size:
                break
        else:
            self.pos = pos
            return
        raise broken(self.path, f"truncated GGUF header: {what} runs past the end of the file")


def _text(vtype: int, value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value, ensure_ascii=False)
    if vtype == FLOAT32:
        return str(np.float32(value))  # shortest text that round-trips the float32 ("0.1")
    return str(value)


def parse_gguf_header(path: Path, buf, size: int) -> GGUFHeader:
    """Parse and bounds-check everything before the tensor data (little-endian GGUF v2/v3).

    `buf` is any buffer over the file (an mmap: nothing is copied but short strings).
    """
    c = _Cursor(path, buf, size)
    magic = bytes(buf[c.take(4, "magic") : 4])
    if magic != b"GGUF":
        kind = content_kind(bytes(buf[:min(size, HEAD_BYTES)]), size)
        if kind is not None:  # a safetensors file renamed, JSON, a torch pickle
            raise broken(path, *named_otherwise(path, kind))
        raise broken(path, f"not a GGUF file (magic {magic!r})", hint="give a .gguf file, or check the download")
    version = c.unpack("<I", "version")
    if version & 0xFFFF == 0 and version != 0:
        raise broken(path, "big-endian GGUF files are not supported", hint="convert it to little-endian")
    if version > PLAUSIBLE_GGUF_VERSION:  # the magic, then noise: read as "a newer GGUF, update residency"
        raise broken(path, f"GGUF version field reads {version}, no GGUF version (expected 2 or 3): the header is "
                     "damaged", hint=BROKEN_HINT)
    if version not in SUPPORTED_VERSIONS:
        raise broken(path, f"GGUF version {version} is not supported (expected 2 or 3)",
                     hint="a newer GGUF than this residency reads: update residency, or write the file as GGUF v3"
                     if version > max(SUPPORTED_VERSIONS) else BROKEN_HINT)
    n_tensors = c.unpack("<Q", "tensor count")
    n_kv = c.unpack("<Q", "metadata count")
    # Each KV takes ≥ 13 bytes and each tensor info ≥ 24: larger counts are lies.
    if n_kv * 13 + n_tensors * 24 > size - c.pos:
        raise broken(
            path, f"GGUF header claims {n_tensors} tensors and {n_kv} metadata keys, more than the file holds"
        )
    check_tensor_count(path, n_tensors)
    if n_kv > MAX_METADATA_KEYS:
        raise broken(path, f"GGUF header claims {n_kv} metadata keys, more than the {MAX_METADATA_KEYS} residency reads")
    fields: dict[str, tuple[int, str | None]] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}", limit=4 * MAX_NAME_BYTES)  # UTF-8: ≤ 4 bytes a character
        if len(key) > MAX_NAME_BYTES:
            raise broken(path, f"GGUF metadata key #{i} {key[:60]!r}… is longer than {MAX_NAME_BYTES} characters")
        vtype = c.unpack("<I", f"metadata {key!r:.60} type")
        value = c.value(vtype, f"metadata {key!r:.60}")
        if key in fields:
            raise broken(path, f"GGUF metadata key {key!r:.80} appears twice")
        fields[key] = (vtype, _text(vtype, value))
    tensors = _tensor_infos(c, n_tensors)
    alignment = _alignment(path, fields)
    for t in tensors:
        if t.offset % alignment:
            raise broken(
                path,
                f"GGUF tensor {t.name!r:.80}: data offset {t.offset} is not a multiple of the file's "
                f"alignment {alignment}",
            )
    data_offset = c.pos + (-c.pos % alignment)
    return GGUFHeader(version, fields, tensors, alignment, data_offset)


_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


def _tensor_infos(c: _Cursor, n_tensors: int) -> list[GGUFTensorInfo]:
    """The tensor table. The hot loop of files with many tensors (~5 µs each): plain arithmetic on
    the cursor, error text built only on the error path."""
    path, buf, size = c.path, c.buf, c.size
    tensors: list[GGUFTensorInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"tensor #{i} name", limit=4 * MAX_NAME_BYTES)
        check_name(path, name)
        pos = c.pos
        if size - pos < 4:
            c.take(4, f"tensor {name!r:.60} rank")
        n_dims = _U32.unpack_from(buf, pos)[0]
        if n_dims > GGML_MAX_DIMS:  # a file no llama.cpp build loads
            raise broken(path, f"GGUF tensor {name!r:.60} claims {n_dims} dimensions; GGUF allows at most "
                               f"{GGML_MAX_DIMS}")
        if size - pos < 4 + 8 * n_dims + 12:
            c.take(4 + 8 * n_dims + 12, f"tensor {name!r:.60} dims, type and offset")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        pos += 4 + 8 * n_dims
        ggml_type = _U32.unpack_from(buf, pos)[0]
        offset = _U64.unpack_from(buf, pos + 4)[0]
        c.pos = pos + 12
        if name in names:
            raise broken(path, f"GGUF tensor {name!r:.80} appears twice")
        names.add(name)
        tensors.append(GGUFTensorInfo(name, dims, ggml_type, offset))
    return tensors


def _alignment(path: Path, fields: dict[str, tuple[int, str | None]]) -> int:
    if "general.alignment" not in fields:
        return DEFAULT_ALIGNMENT
    vtype, text = fields["general.alignment"]
    if vtype != UINT32:  # "alignment 32 is not a uint32 power of two" hid that "32" was a string
        from gguf import GGUFValueType

        kind = GGUFValueType(vtype).name.lower() if vtype in GGUFValueType._value2member_map_ else f"type {vtype}"
        raise broken(path, f"GGUF general.alignment is a {kind}, not a uint32")
    alignment = int(text) if text is not None else 0
    if not 0 < alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
        raise broken(
            path,
            f"GGUF general.alignment {text!s:.40} is not a uint32 power of two up to {MAX_ALIGNMENT}",
        )
    return alignment
