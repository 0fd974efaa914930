"""GGUF: our bounded header parser to read, gguf-py's GGUFWriter to write.

ggml lists dimensions fastest-first; everything here converts to torch order at the edge.
FP8 and NF4 have no ggml type: they travel as I8 bytes plus residency.* string metadata.
"""

from __future__ import annotations

import math
import mmap
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

from residency.checkpoint.entry import (
    FORMAT_KEY,
    SHAPE_KEY,
    TensorEntry,
    check_layout,
    is_reserved_key,
    resolve,
    shape_to_str,
)
from residency.checkpoint.errors import broken
from residency.checkpoint.gguf_header import GGML_MAX_DIMS, STRING, GGUFTensorInfo, parse_gguf_header
from residency.checkpoint.limits import container_nbytes
from residency.checkpoint.packing import PackedTensor
from residency.checkpoint.safetensors_io import LeftOut
from residency.formats import format_for_gguf_type, get_format

ARCH_KEY = "general.architecture"
DEFAULT_ARCH = "residency"
_RAW_TYPE = GGMLQuantizationType.I8
# ggml type id → (type, weights per block, bytes per block); an Enum call per tensor costs µs.
_GGML_TYPES = {int(q): (q, *GGML_QUANT_SIZES[q]) for q in GGMLQuantizationType if q in GGML_QUANT_SIZES}


# ggml types a GGUF holds beside weights (token ids, masks, a float64 table), as safetensors' OTHER_DTYPES: listed
# apart (LeftOut), their byte ranges checked, never read. I8 is one too unless a residency.* key names it (FP8, NF4).
_OTHER_GGML = frozenset(int(q) for q in (GGMLQuantizationType.I16, GGMLQuantizationType.I32, GGMLQuantizationType.I64,
                                         GGMLQuantizationType.F64))


def read_gguf(path: Path, file_size: int) -> tuple[list[TensorEntry], dict[str, str], list[LeftOut]]:
    """Entries (in data order, torch shapes), metadata (as strings) and the tensors left out (integer and F64
    ones) of one .gguf file.

    Long metadata arrays (tokenizer tables) are skipped; short ones become JSON text.
    """
    if file_size < 24:
        raise broken(path, f"file is {file_size} bytes, too short for a GGUF header")
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError:  # an empty file cannot be mapped (it shrank since stat)
        raise broken(path, "file is empty") from None
    with mm:
        header = parse_gguf_header(path, mm, min(file_size, len(mm)))
    meta: dict[str, str] = {}
    overrides: dict[str, str] = {}
    for key, (vtype, text) in header.fields.items():
        if is_reserved_key(key):
            if vtype != STRING:
                raise broken(path, f"GGUF metadata {key!r:.80} must be a string")
            overrides[key] = text or ""
        elif text is not None:
            meta[key] = text
    entries, others = [], []
    # A model repeats a few (type, dims) pairs thousands of times: resolve each pair once.
    # Tensors named by residency.* keys are resolved on their own.
    seen: dict[tuple[int, tuple[int, ...]], tuple[str, tuple[int, ...], int]] = {}
    data_offset = header.data_offset
    for t in header.tensors:
        named = bool(overrides) and (FORMAT_KEY + t.name in overrides or SHAPE_KEY + t.name in overrides)
        if t.ggml_type in _OTHER_GGML or (t.ggml_type == _RAW_TYPE and not named):
            others.append(_left_out(path, t, data_offset))
            continue
        key = (t.ggml_type, t.dims)
        resolved = None if named else seen.get(key)
        if resolved is None:
            resolved = _resolve(path, t, overrides)
            if not named:
                seen[key] = resolved
        fmt_name, shape, nbytes = resolved
        orig = _orig_shape(path, t.name, shape, meta) if meta else None
        entries.append(TensorEntry(t.name, shape if orig is None else orig, fmt_name, nbytes, path,
                                   data_offset + t.offset, stored_shape=None if orig is None else shape))
    # the left-out tensors' ranges are checked with the others' (no overlap, inside the data section)
    check_layout(path, [*entries, *(TensorEntry(o.name, o.shape, "BF16", o.nbytes, path, o.offset) for o in others)],
                 header.data_offset, file_size)
    entries.sort(key=lambda e: e.offset)
    return entries, meta, others


COMFY_ORIG_SHAPE = "comfy.gguf.orig_shape."  # ComfyUI-GGUF's converter: a reshaped tensor's own shape


def _orig_shape(path: Path, name: str, stored: tuple[int, ...], meta: Mapping[str, str]) -> tuple[int, ...] | None:
    """The shape ComfyUI-GGUF recorded for tensor `name` (SD1/SDXL convs stored as (n/256, 256) to quantize them),
    checked to hold its weights; None where none is recorded."""
    text = meta.get(COMFY_ORIG_SHAPE + name)
    if text is None:
        return None
    key = f"metadata {COMFY_ORIG_SHAPE + name!r:.100}"
    # the header's text of an integer array ("[320, 4, 3, 3]"): its digits, not a JSON parse (user JSON goes
    # through jsonfile.read_json; this is a few digits of a checkpoint's own header)
    listed = re.fullmatch(r"\[\s*(\d{1,13}(?:\s*,\s*\d{1,13}){0,7})\s*\]", text)
    shape = [int(d) for d in re.findall(r"\d+", listed[1])] if listed else None
    if not (shape and all(0 < d < 2**40 for d in shape)):
        raise broken(path, f"{key} is {text[:80]!r}, not a tensor shape (a list of 1 to 8 positive integers)",
                     hint="the file's converter wrote it: convert the model again")
    if math.prod(shape) != math.prod(stored):
        raise broken(path, f"{key} is {shape}, {math.prod(shape)} weights, but the tensor holds {math.prod(stored)} "
                           f"(stored as {list(stored)})", hint="the file's converter wrote it: convert the model again")
    return tuple(shape)


def _left_out(path: Path, t: GGUFTensorInfo, data_offset: int) -> LeftOut:
    """A tensor residency does not store (_OTHER_GGML), its size checked (its place: with the others')."""
    qtype, block, type_size = _GGML_TYPES[t.ggml_type]
    stored_shape = tuple(reversed(t.dims))
    nbytes = container_nbytes(path, t.name, stored_shape, block, type_size)
    return LeftOut(t.name, qtype.name, stored_shape, nbytes, data_offset + t.offset)


def _resolve(path: Path, t: GGUFTensorInfo, overrides: Mapping[str, str]) -> tuple[str, tuple[int, ...], int]:
    """(format name, torch shape, stored bytes) of one tensor info, every size checked."""
    known = _GGML_TYPES.get(t.ggml_type)
    if known is None:
        raise broken(path, f"tensor {t.name!r:.80}: unknown ggml type {t.ggml_type}")
    qtype, block, type_size = known
    stored_shape = tuple(reversed(t.dims))
    if stored_shape and stored_shape[-1] % block:
        raise broken(
            path, f"tensor {t.name!r:.80}: row of {stored_shape[-1]} is not a multiple of the {qtype.name} block"
        )
    nbytes = container_nbytes(path, t.name, stored_shape, block, type_size)
    base = format_for_gguf_type(int(qtype))
    if base is None and qtype != _RAW_TYPE:  # IQ*, TQ*, MXFP4: weights in a quant residency cannot unpack
        readable = sorted(q.name for q in GGMLQuantizationType if format_for_gguf_type(int(q)) is not None)
        raise broken(path, f"tensor {t.name!r:.80} is {qtype.name}, a GGUF quant type residency does not read "
                           f"(it reads {', '.join(readable)})",
                     hint="quantize the model again to one of those (llama.cpp's llama-quantize --allow-requantize "
                          "model.gguf out.gguf Q4_K_M), or give the original safetensors")
    fmt_name, shape = resolve(path, t.name, base, stored_shape, nbytes, overrides, qtype == _RAW_TYPE, qtype.name)
    return fmt_name, shape, nbytes


def _add_string(writer: GGUFWriter, key: str, value: str) -> None:
    # GGUFWriter.add_string silently drops empty strings; "" is a real value (a scalar's shape).
    writer.add_key_value(key, value, GGUFValueType.STRING)


def write_gguf(path: Path, tensors: Sequence[PackedTensor], metadata: Mapping[str, str]) -> None:
    """Write one .gguf at `path` (a temp path: the caller commits it). Tensor data is not copied."""
    writer = GGUFWriter(path, arch=metadata.get(ARCH_KEY, DEFAULT_ARCH))
    try:
        for key, value in metadata.items():
            if key != ARCH_KEY:
                _add_string(writer, key, value)
        for t in tensors:
            fmt = get_format(t.format)
            shape = t.shape if t.shape else (1,)
            data = t.data.numpy()
            if fmt.gguf_type is None:
                _add_string(writer, FORMAT_KEY + t.name, fmt.name)
                _add_string(writer, SHAPE_KEY + t.name, shape_to_str(t.shape))
                writer.add_tensor(t.name, data, raw_dtype=_RAW_TYPE)
                continue
            if not t.shape:
                _add_string(writer, SHAPE_KEY + t.name, "")
            elif len(shape) > GGML_MAX_DIMS:  # a Conv3d weight: its leading dims folded into one, the shape kept aside
                _add_string(writer, SHAPE_KEY + t.name, shape_to_str(t.shape))
                shape = (math.prod(shape[: 1 - GGML_MAX_DIMS]), *shape[1 - GGML_MAX_DIMS :])
            # GGUFWriter infers the ggml shape of a raw uint8 array from its byte shape.
            byte_shape = (*shape[:-1], shape[-1] // fmt.block_weights * fmt.block_bytes)
            writer.add_tensor(t.name, data.reshape(byte_shape), raw_dtype=GGMLQuantizationType(fmt.gguf_type))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
