"""save_checkpoint / write_packed: pack tensors and write .safetensors or .gguf atomically.

The extension picks the container; writes go through a temp file, so a failure never
leaves a partial checkpoint or clobbers the previous one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from residency.checkpoint.atomic import atomic_output
from residency.checkpoint.entry import is_reserved_key
from residency.checkpoint.errors import CheckpointError, broken
from residency.checkpoint.gguf_io import write_gguf
from residency.checkpoint.packing import PackedTensor, check_packed, pack_tensors
from residency.checkpoint.safetensors_io import write_safetensors
from residency.validate import a_type

SUFFIXES = (".safetensors", ".gguf")
_GGUF_RESERVED = ("general.alignment",)  # GGUFReader needs it as uint32; we only write strings


def _check_target(
    path: Path, metadata: Mapping[str, str] | None, tensors: list[PackedTensor]
) -> dict[str, str]:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise broken(path, f"unknown checkpoint extension {path.suffix!r}", hint="use .safetensors or .gguf")
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise broken(
                path,
                f"metadata {key!r:.80} → {type(value).__name__}: keys and values must be strings",
                hint=None,
            )
        if is_reserved_key(key) or (suffix == ".gguf" and key in _GGUF_RESERVED):
            raise broken(
                path, f"metadata key {key!r:.80} is reserved for residency's own bookkeeping", hint=None
            )
    for t in tensors:
        if suffix == ".safetensors" and t.name == "__metadata__":
            raise broken(path, "a tensor cannot be named '__metadata__' in safetensors", hint=None)
    return meta


def _write(path: Path, tensors: list[PackedTensor], metadata: Mapping[str, str] | None) -> Path:
    path = Path(os.fspath(path))
    meta = _check_target(path, metadata, tensors)
    with atomic_output(path) as tmp:
        if path.suffix.lower() == ".gguf":
            write_gguf(tmp, tensors, meta)
        else:
            with open(tmp, "wb") as f:
                write_safetensors(f, tensors, meta, path)
    return path


def save_checkpoint(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    formats: str | Mapping[str, str] = "F32",
    metadata: Mapping[str, str] | None = None,
    *,
    fallback: str | None = "F32",
) -> Path:
    """Pack float `tensors` and write them to `path` (.safetensors or .gguf), atomically.

    `formats` is one format name for every tensor, or a mapping {tensor name: format}
    whose "*" key (default "F32") covers the tensors it does not name. Tensors that got
    the default format fall back to `fallback` when the default cannot hold their shape,
    or is quantized and they are 0-D/1-D; an explicitly mapped format must hold its
    tensor or FormatError is raised. fallback=None turns the fallback off. `metadata`: string
    pairs stored in the file's header. Returns the path written.
    Raises FormatError for an unknown format or a tensor it cannot hold, CheckpointError (naming the
    file) for a bad extension, name or metadata, or a failed write (an existing file is left as it was).
    Cost: the whole packed checkpoint is held in host memory before writing.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"save_checkpoint's path is {a_type(path)}",
                              hint="give a file name ending in .safetensors or .gguf")
    if not isinstance(tensors, Mapping):  # a list or one tensor: its names are what the file keys them by
        raise CheckpointError(f"{os.fspath(path)}: save_checkpoint takes a mapping of name -> tensor, not a "
                              f"{type(tensors).__name__}", hint="e.g. model.state_dict() or {'weight': t}")
    packed = pack_tensors(tensors, formats, fallback)
    return _write(Path(os.fspath(path)), packed, metadata)


def write_packed(
    path: str | os.PathLike[str],
    packed: Mapping[str, tuple[torch.Tensor, tuple[int, ...], str]],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write already-packed blobs {name: (flat uint8 tensor, torch shape, format name)}."""
    items = [check_packed(name, data, shape, fmt) for name, (data, shape, fmt) in packed.items()]
    return _write(Path(os.fspath(path)), items, metadata)
