"""TensorEntry (where one tensor's bytes live) and the checks every container shares.

Both readers reduce a header to entries, then validate shapes, sizes and byte ranges here,
so a lying header fails the same way whatever the container.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from residency.checkpoint.errors import broken
from residency.checkpoint.limits import MAX_DIMS, check_dims, tensor_nbytes
from residency.errors import FormatError
from residency.formats import StorageFormat, get_format

# Per-tensor metadata keys for formats the container has no dtype for (stored as raw bytes).
FORMAT_KEY = "residency.format."
SHAPE_KEY = "residency.shape."

PACKED = "packed"  # the byte range is exactly the format's packed blob
E4M3 = "e4m3"  # raw e4m3 bytes (safetensors F8_E4M3): FP8 with unit row scales, rebuilt on read


class TensorEntry(NamedTuple):
    """One tensor of a checkpoint: logical shape (torch order), format, and its byte range.

    A NamedTuple, immutable and hashable: a reader makes one per header entry, and a frozen dataclass's
    per-field setattr cost ~1 µs of the ~4 µs an entry costs (a 200,000-tensor header: 0.2 s)."""

    name: str
    shape: tuple[int, ...]
    format: str  # a residency format name ("Q4_K", "BF16", …)
    nbytes: int  # bytes as stored in the file
    path: Path  # the file holding it
    offset: int  # absolute byte offset in that file
    encoding: str = PACKED  # PACKED, or E4M3 (read_packed then builds the FP8 blob: a copy)
    # the shape its bytes are laid out in, where the file records another for the tensor (ComfyUI-GGUF keeps a conv
    # weight as (n/256, 256) and its own shape in a key): `shape` is the model's, this one unpacks; None: `shape`
    stored_shape: tuple[int, ...] | None = None

    @property
    def zero_copy(self) -> bool:
        """True when the stored bytes are the packed blob, so they can be streamed as is."""
        return self.encoding == PACKED

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def is_reserved_key(key: str) -> bool:
    return key.startswith(FORMAT_KEY) or key.startswith(SHAPE_KEY)


def shape_to_str(shape: Sequence[int]) -> str:
    return ",".join(str(int(d)) for d in shape)


def shape_from_str(path: Path, name: str, text: object) -> tuple[int, ...]:
    """Parse `residency.shape.<name>` ("" is a scalar); anything malformed is a CheckpointError."""
    if not isinstance(text, str) or len(text) > 32 * MAX_DIMS:
        raise broken(path, f"tensor {name!r:.80}: its {SHAPE_KEY}* value is not a short string of integers")
    if text.strip() == "":
        return ()
    try:
        dims = [int(part) for part in text.split(",")]
    except ValueError:
        raise broken(
            path, f"tensor {name!r:.80}: its {SHAPE_KEY}* value {text!r:.60} is not comma-separated integers"
        ) from None
    return check_dims(path, name, dims)


def packed_nbytes(fmt: StorageFormat, shape: Sequence[int]) -> int:
    """Packed size of `shape` in `fmt`; a scalar () is packed like (1,). Raises FormatError."""
    return fmt.nbytes(tuple(shape) if len(shape) else (1,))


def format_or_fail(path: Path, name: str, fmt_name: str) -> StorageFormat:
    try:
        return get_format(fmt_name)
    except FormatError:
        raise broken(path, f"tensor {name!r:.80}: unknown storage format {fmt_name!r:.40}") from None


def resolve(
    path: Path,
    name: str,
    base: StorageFormat | None,
    stored_shape: tuple[int, ...],
    nbytes: int,
    overrides: Mapping[str, str],
    raw_container: bool,
    dtype_label: str,
    one_byte_per_weight: bool = False,
) -> tuple[str, tuple[int, ...]]:
    """The (format name, torch shape) of one tensor, checked against its `nbytes` byte range.

    `base` is the format the container dtype implies (None for raw bytes or unknown dtypes);
    `overrides` are the file's residency.format./residency.shape. keys; a format override
    is honoured only on a raw-byte container tensor (U8 in safetensors, I8 in GGUF).
    """
    fmt_name = overrides.get(FORMAT_KEY + name)
    if fmt_name is not None:
        if not raw_container:
            raise broken(
                path,
                f"tensor {name!r:.80}: has a {FORMAT_KEY}* key but is stored as {dtype_label}, not raw bytes",
            )
        if SHAPE_KEY + name not in overrides:
            raise broken(
                path, f"tensor {name!r:.80}: has a {FORMAT_KEY}* key but its {SHAPE_KEY}* key is missing"
            )
        fmt = format_or_fail(path, name, fmt_name)
    elif base is None:
        raise broken(
            path,
            f"tensor {name!r:.80}: unsupported dtype {dtype_label!r:.40}",
            hint="residency reads F32, F16, BF16, F8_E4M3 and GGUF quant types as weights (integer, bool and "
                 "F64 tensors are listed apart); convert other tensors first",
        )
    else:
        fmt = base
    shape = stored_shape
    if SHAPE_KEY + name in overrides:
        shape = shape_from_str(path, name, overrides[SHAPE_KEY + name])
    tensor_nbytes(path, name, fmt, shape, nbytes, one_byte_per_weight)
    return fmt.name, shape


def check_layout(path: Path, entries: Sequence[TensorEntry], data_start: int, file_size: int) -> None:
    """Every byte range inside [data_start, file_size) and no two non-empty ranges overlapping."""
    for e in entries:
        if e.offset < data_start or e.nbytes < 0 or e.offset + e.nbytes > file_size:
            raise broken(
                path,
                f"tensor {e.name!r:.80}: bytes [{e.offset}, {e.offset + e.nbytes}) lie outside the data "
                f"section [{data_start}, {file_size}) — truncated file or lying header",
            )
    spans = sorted((e.offset, e.offset + e.nbytes, e.name) for e in entries if e.nbytes > 0)
    for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            raise broken(path, f"tensors {name_a!r:.80} and {name_b!r:.80} overlap in the file")
