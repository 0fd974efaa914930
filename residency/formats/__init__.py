"""The registry of weight storage formats: byte size, host-side pack, device-side unpack.

One dequant path per format; everything else (planner, runtime, checkpoint I/O) looks
formats up here by name.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from residency.errors import FormatError
from residency.formats import compiled as _compiled
from residency.formats.base import OUT_DTYPES, StorageFormat, relative_rms_error
from residency.formats.dtypes import (
    COMPUTE_DTYPE_BYTES,
    DTYPE_FORMAT,
    KV_DTYPE_BYTES,
    KV_TORCH_DTYPES,
    TORCH_DTYPES,
    weights_format,
)
from residency.formats.float_formats import FP8RowFormat, PlainFormat
from residency.formats.gguf_block import GGUFBlockFormat
from residency.formats.gguf_kquants import DEQUANT_K
from residency.formats.gguf_legacy import DEQUANT_LEGACY, QUANT_LEGACY
from residency.formats.kquant_pack import QUANT_K
from residency.formats.nf4 import NF4Format


def _gguf(name: str) -> GGUFBlockFormat:
    qtype = GGMLQuantizationType[name]
    block_weights, block_bytes = GGML_QUANT_SIZES[qtype]
    dequant = DEQUANT_LEGACY.get(name) or DEQUANT_K[name]
    quant = QUANT_LEGACY.get(name) or QUANT_K.get(name)
    return GGUFBlockFormat(
        name=name,
        block_weights=block_weights,
        block_bytes=block_bytes,
        gguf_type=int(qtype),
        can_pack=quant is not None,
        dequant_kernel=dequant,
        quant_kernel=quant,
    )


def _build() -> dict[str, StorageFormat]:
    formats: list[StorageFormat] = [
        PlainFormat("F32", 1, 4, int(GGMLQuantizationType.F32), torch_dtype=torch.float32),
        PlainFormat("F16", 1, 2, int(GGMLQuantizationType.F16), torch_dtype=torch.float16),
        PlainFormat("BF16", 1, 2, int(GGMLQuantizationType.BF16), torch_dtype=torch.bfloat16),
        # block_bytes=1 counts the e4m3 bytes; nbytes() adds the 4-byte scale per row.
        FP8RowFormat("FP8", 1, 1, None),
    ]
    formats += [_gguf(n) for n in ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K")]
    # 64 weights → 32 bytes of codes + one float32 absmax.
    formats.append(NF4Format("NF4", 64, 36, None))
    return {f.name: f for f in formats}


FORMATS: dict[str, StorageFormat] = _build()
_BY_GGUF_TYPE = {f.gguf_type: f for f in FORMATS.values() if f.gguf_type is not None}


def get_format(name: str) -> StorageFormat:
    """The StorageFormat named `name`, case-insensitively (`q4_k`, `Q4_K`, `bf16`): its byte size, pack and
    unpack. Raises FormatError (a ResidencyError) for an unknown name, listing the known ones."""
    fmt = FORMATS.get(str(name).upper())
    if fmt is None:
        raise FormatError(
            f"unknown storage format {name!r}",
            hint="known formats: " + ", ".join(FORMATS),
        )
    return fmt


def format_for_gguf_type(gguf_type: int) -> StorageFormat | None:
    return _BY_GGUF_TYPE.get(int(gguf_type))


__all__ = [
    "COMPUTE_DTYPE_BYTES",
    "DTYPE_FORMAT",
    "KV_DTYPE_BYTES",
    "KV_TORCH_DTYPES",
    "TORCH_DTYPES",
    "weights_format",
    "FORMATS",
    "OUT_DTYPES",
    "StorageFormat",
    "FormatError",
    "get_format",
    "format_for_gguf_type",
    "relative_rms_error",
    "use_compiled",
]


def use_compiled(format_names: set[str] | list[str] | tuple[str, ...]) -> None:
    """Route the given formats' unpack through torch.compile (empty to turn it off). Names as get_format takes
    them (any case); raises FormatError for a bare string (its letters were taken as names) or an unknown name."""
    if isinstance(format_names, (str, bytes)):
        raise FormatError(f"use_compiled({format_names!r}): give a set of format names, e.g. {{{format_names!r}}}")
    _compiled.use_compiled({get_format(n).name for n in format_names})  # "q8_0" was kept as is, never matched
