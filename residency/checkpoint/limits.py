"""Limits on what a checkpoint header may claim, and the one function that sizes a tensor from it.

Every byte count derived from a header (shape × format) goes through `tensor_nbytes`, which
checks it against the bytes the file really holds before anything is allocated or mapped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from residency.checkpoint.errors import broken
from residency.formats import StorageFormat, get_format
from residency.validate import control_character, show

MAX_DIMS = 32  # far above any real tensor (4-5); bounds the work one shape can cause
# Product of a shape's non-zero dimensions. With a zero dimension the element count is 0 and
# no byte range bounds the others; this keeps every dim, stride and per-row count in int64
# (torch.empty of a dim ≥ 2^63 raises TypeError) and 4× it well inside Python's cheap ints.
MAX_EXTENT = 2**48
# What reading a tensor may allocate beyond its stored bytes: raw F8_E4M3 gains a 4-byte
# scale per row (≤ 4× its bytes, as each row holds ≥ 1 byte), plus this much for empty tensors,
# whose rows hold no bytes at all (a [rows, 0] tensor would otherwise allocate rows × 4 bytes).
MAX_SCALE_BYTES_PER_STORED_BYTE = 4
EMPTY_TENSOR_SLACK_BYTES = 4096
# Tensors per file or shard set. Real checkpoints hold 1k-3k per file; the largest MoE sets ~90k (DeepSeek-V3:
# 61 layers × 256 experts × 3 matrices × weight + scale) to ~140k (384 experts) across all shards. Reading a
# header entry costs ~4-5 µs (JSON, checks, its TensorEntry), so this bounds the costliest header a hostile file
# can carry — valid-looking entries up to the cap, one lie at the end — to about a second and ~200 MB, while
# `inspect` of a 200,000-tensor file still reads.
MAX_TENSORS = 200 * 1024
MAX_NAME_BYTES = 4096  # one tensor name; real ones are < 200 bytes (GGUF's own limit is 64)


def check_name(path: Path, name: str) -> None:
    """A tensor name as residency reads it: non-empty, at most MAX_NAME_BYTES, printable (an escape sequence in a
    name cleared and recoloured the terminal in `inspect`'s table, a newline split its row)."""
    # the file may be well formed (the safetensors library writes and reads such names): the name is the problem
    rename = "rename the tensor where the checkpoint is written (a state_dict key) and save it again"
    if not name:  # or a damaged header: one that lists more tensors than it holds reads on into zero bytes
        raise broken(path, "a tensor name is empty", hint=f"{rename}; a file not written so is damaged (a header "
                     "listing more tensors than the file holds reads as this): write it again")
    if len(name) > MAX_NAME_BYTES:
        raise broken(path, f"tensor name {name[:80]!r}… is {len(name)} characters, more than the "
                     f"{MAX_NAME_BYTES} residency reads", hint=rename)
    bad = control_character(name)
    if bad is not None:
        raise broken(path, f"tensor name {name[:80]!r} holds a control character ({bad!r})",
                     hint=f"{rename} without it; a file not written so is damaged: write it again")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in a JSON header): printing it raised a traceback
        raise broken(path, f"tensor name {name[:80]!r} is not valid Unicode (a lone surrogate)",
                     hint=f"{rename}; a file not written so is damaged: write it again") from None


def check_tensor_count(path: Path, count: int) -> None:
    if count > MAX_TENSORS:
        raise broken(
            path,
            f"header lists {count} tensors, more than the {MAX_TENSORS} residency reads from one file",
            hint="split the checkpoint into shards (a directory of files)",
        )


def check_dims(path: Path, name: str, dims: object) -> tuple[int, ...]:
    """A header's shape as a tuple of ints ≥ 0, at most MAX_DIMS of them, non-zero product ≤ MAX_EXTENT.

    The product skips zeros, so each dimension is bounded on its own too: a zero elsewhere in
    the shape does not let a 2^64 dimension through.
    """
    if not isinstance(dims, (list, tuple)) or len(dims) > MAX_DIMS:
        raise broken(path, f"tensor {name!r:.80}: shape {show(dims)} is not a list of at most {MAX_DIMS} integers")
    extent = 1
    for d in dims:
        if type(d) is not int or d < 0:  # `type`, not isinstance: True is not a dimension
            raise broken(
                path, f"tensor {name!r:.80}: shape {list(dims)!r:.80} has a dimension that is not an integer ≥ 0"
            )
        if d:
            extent *= d  # ≤ 32 factors < 2^64 each: a short Python int, never an overflow
    if extent > MAX_EXTENT:
        raise broken(path, f"tensor {name!r:.80}: shape {list(dims)!r:.120} spans more than {MAX_EXTENT} elements")
    return tuple(dims)


def container_nbytes(path: Path, name: str, dims: Sequence[int], block_weights: int, block_bytes: int) -> int:
    """Bytes a container dtype (GGUF type, safetensors dtype) gives `dims` (checked first)."""
    shape = check_dims(path, name, dims)
    if shape and shape[-1] % block_weights:
        raise broken(path, f"tensor {name!r:.80}: row of {shape[-1]} is not a multiple of its {block_weights}-weight block")
    return math.prod(shape) // block_weights * block_bytes


@lru_cache(maxsize=1 << 14)
def _packed_nbytes(fmt_name: str, shape: tuple[int, ...]) -> int | None:
    # Models repeat a few shapes thousands of times; `shape` holds checked ints only, so equal
    # keys are equal shapes (no True == 1 aliasing).
    fmt = get_format(fmt_name)
    return fmt.nbytes(shape) if fmt.supports(shape) else None


def tensor_nbytes(
    path: Path, name: str, fmt: StorageFormat, shape: Sequence[int], stored_nbytes: int, one_byte_per_weight: bool
) -> int:
    """Bytes of the packed blob `read_packed` returns for `shape` in `fmt`; a CheckpointError unless
    the header's `stored_nbytes` are exactly what the shape needs and reading costs a bounded
    multiple of them.

    one_byte_per_weight: stored as raw e4m3 bytes (safetensors F8_E4M3), the packed blob then adds
    the row scales on read. A scalar () is packed like (1,).
    """
    shape = check_dims(path, name, shape)
    packed_shape = shape if shape else (1,)
    packed = _packed_nbytes(fmt.name, packed_shape)
    if packed is None:
        raise broken(
            path,
            f"tensor {name!r:.80}: {fmt.name} cannot store shape {shape}: its last dimension must be a "
            f"multiple of {fmt.block_weights}",
        )
    expect = math.prod(packed_shape) if one_byte_per_weight else packed
    if expect != stored_nbytes:
        raise broken(
            path,
            f"tensor {name!r:.80}: {fmt.name} {shape} takes {expect} bytes but the header gives {stored_nbytes}",
        )
    if packed - stored_nbytes > MAX_SCALE_BYTES_PER_STORED_BYTE * stored_nbytes + EMPTY_TENSOR_SLACK_BYTES:
        raise broken(
            path,
            f"tensor {name!r:.80}: {fmt.name} {shape} would take {packed} bytes in memory "
            f"from {stored_nbytes} stored bytes",
        )
    return packed
