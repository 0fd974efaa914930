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

import numpy as np

from residency.checkpoint.entry import MAX_DIMS
from residency.checkpoint.errors import broken

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
MAX_WALK_ITEMS = 16_000_000  # string/nested array items walked one by one, in total (bounds the time)
MAX_ARRAY_DEPTH = 3
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensorInfo:
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

    def string(self, what: str, decode: bool = True) -> str | None:
        n = self.unpack("<Q", what + " length")
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
        items = [self.value(sub, what, depth + 1, keep) for _ in range(count)]
        return items if keep else None


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
        raise broken(path, f"not a GGUF file (magic {magic!r})")
    version = c.unpack("<I", "version")
    if version & 0xFFFF == 0 and version != 0:
        raise broken(path, "big-endian GGUF files are not supported", hint="convert it to little-endian")
    if version not in SUPPORTED_VERSIONS:
        raise broken(path, f"GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors = c.unpack("<Q", "tensor count")
    n_kv = c.unpack("<Q", "metadata count")
    # Each KV takes ≥ 13 bytes and each tensor info ≥ 24: larger counts are lies.
    if n_kv * 13 + n_tensors * 24 > size - c.pos:
        raise broken(
            path, f"GGUF header claims {n_tensors} tensors and {n_kv} metadata keys, more than the file holds"
        )
    fields: dict[str, tuple[int, str | None]] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        vtype = c.unpack("<I", f"metadata {key!r:.60} type")
        value = c.value(vtype, f"metadata {key!r:.60}")
        if key in fields:
            raise broken(path, f"GGUF metadata key {key!r:.80} appears twice")
        fields[key] = (vtype, _text(vtype, value))
    tensors: list[GGUFTensorInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"tensor #{i} name")
        n_dims = c.unpack("<I", f"tensor {name!r:.60} rank")
        if n_dims > MAX_DIMS:
            raise broken(path, f"GGUF tensor {name!r:.60} claims {n_dims} dimensions")
        start = c.take(8 * n_dims, f"tensor {name!r:.60} dims")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, start)
        ggml_type = c.unpack("<I", f"tensor {name!r:.60} type")
        offset = c.unpack("<Q", f"tensor {name!r:.60} offset")
        if name in names:
            raise broken(path, f"GGUF tensor {name!r:.80} appears twice")
        names.add(name)
        tensors.append(GGUFTensorInfo(name, tuple(dims), ggml_type, offset))
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in fields:
        vtype, text = fields["general.alignment"]
        alignment = int(text) if vtype == UINT32 and text is not None else 0
        if alignment <= 0 or alignment & (alignment - 1):
            raise broken(path, "GGUF general.alignment is not a uint32 power of two")
    data_offset = c.pos + (-c.pos % alignment)
    return GGUFHeader(version, fields, tensors, alignment, data_offset)
