"""PackedTensor and the choice of format per tensor before writing a checkpoint.

The writers only move bytes; deciding formats, falling back, and validating blobs happen here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from residency.checkpoint.entry import packed_nbytes
from residency.checkpoint.limits import MAX_NAME_BYTES
from residency.errors import FormatError
from residency.formats import StorageFormat, get_format
from residency.validate import control_character

DEFAULT_KEY = "*"  # in a formats mapping: the format of tensors the mapping does not name


@dataclass(frozen=True)
class PackedTensor:
    """A tensor ready to write: its flat uint8 CPU blob, torch shape and format name."""

    name: str
    data: torch.Tensor  # flat, contiguous, uint8, on the CPU
    shape: tuple[int, ...]
    format: str


def _holds(fmt: StorageFormat, shape: Sequence[int]) -> bool:
    return fmt.supports(tuple(shape) if len(shape) else (1,))


def choose_format(
    name: str, shape: Sequence[int], explicit: str | None, default: str, fallback: str | None
) -> StorageFormat:
    """The format `name` is written in.

    An explicit choice must hold the shape (FormatError otherwise). The default format
    yields to `fallback` for shapes it cannot hold and, when it is quantized, for 0-D/1-D
    tensors (norms, biases: quantizing them saves nothing); fallback=None disables that.
    """
    if explicit is not None:
        fmt = get_format(explicit)
        if not _holds(fmt, shape):
            raise FormatError(
                f"tensor {name!r:.80}: {fmt.name} cannot store shape {tuple(shape)} "
                f"(last dimension must be a multiple of {fmt.block_weights})",
                hint="pick another format for this tensor, or leave it out of the mapping to use the fallback",
            )
        return fmt
    fmt = get_format(default)
    small = len(shape) <= 1 and fmt.is_quantized
    if fallback is not None and (small or not _holds(fmt, shape)):
        fmt = get_format(fallback)
    if not _holds(fmt, shape):
        raise FormatError(
            f"tensor {name!r:.80}: {fmt.name} cannot store shape {tuple(shape)}",
            hint='pass fallback="F32" (or BF16) to keep such tensors unquantized',
        )
    return fmt


def pack_tensors(
    tensors: Mapping[str, torch.Tensor], formats: str | Mapping[str, str], fallback: str | None
) -> list[PackedTensor]:
    """Pack every tensor on the host. Cost: the whole packed checkpoint stays in memory,
    plus one float32 copy of the tensor being packed."""
    if isinstance(formats, str):
        explicit: Mapping[str, str] = {}
        default = formats
    else:
        explicit = {k: v for k, v in formats.items() if k != DEFAULT_KEY}
        default = formats.get(DEFAULT_KEY, "F32")
        unknown = sorted(set(explicit) - set(tensors))
        if unknown:
            raise FormatError(f"formats names tensors that are not being saved: {unknown[:5]}")
    out = []
    for name, tensor in tensors.items():
        # what open_checkpoint reads back (limits.check_name): a file it would refuse is not written
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_BYTES or control_character(name):
            shown = repr(name)[:80]
            raise FormatError(f"tensor name {shown} is not a name a checkpoint can hold (a non-empty string of at "
                              f"most {MAX_NAME_BYTES} printable characters)", hint="key the tensors by their names, "
                              "as model.state_dict() does")
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise FormatError(f"tensor {name!r:.80} is {kind}; only floating-point tensors can be saved")
        shape = tuple(tensor.shape)
        fmt = choose_format(name, shape, explicit.get(name), default, fallback)
        try:
            data = fmt.pack(tensor.reshape(shape if shape else (1,)))
        except FormatError as e:
            raise FormatError(f"tensor {name!r:.80}: {e.message}", e.hint) from e
        out.append(PackedTensor(name, data, shape, fmt.name))
    return out


def check_packed(name: str, data: torch.Tensor, shape: Sequence[int], fmt_name: str) -> PackedTensor:
    """Validate a caller's pre-packed blob: uint8, CPU, exactly the format's size for `shape`."""
    fmt = get_format(fmt_name)
    shape = tuple(int(d) for d in shape)
    if not _holds(fmt, shape):
        raise FormatError(f"tensor {name!r:.80}: {fmt.name} cannot store shape {shape}")
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
        raise FormatError(f"tensor {name!r:.80}: packed data must be a uint8 tensor")
    expect = packed_nbytes(fmt, shape)
    if data.numel() != expect:
        raise FormatError(
            f"tensor {name!r:.80}: {fmt.name} {shape} packs to {expect} bytes, got {data.numel()}"
        )
    return PackedTensor(name, data.detach().to("cpu").contiguous().reshape(-1), shape, fmt.name)
