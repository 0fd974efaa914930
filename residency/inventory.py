"""A model's tensors grouped into blocks and components, with bytes per storage format.

The block is the unit of residency: `dit.blocks.7`, `blk.3`, `vae.decoder.blocks.0`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from residency.formats import FORMATS, get_format
from residency.formats.sizing import sizes_in, tensor_bytes

COMPARE_FORMATS = ("BF16", "Q8_0", "Q6_K", "Q4_K")


@lru_cache(maxsize=64)
def _canonical(fmt_names: tuple[str, ...]) -> tuple[str, ...]:
    """Registered names of `fmt_names` ("q8_0" -> "Q8_0"); FormatError for an unknown one."""
    return tuple(get_format(f).name for f in fmt_names)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order
    format: str  # storage format as stored
    nbytes: int  # bytes as stored

    @property
    def params(self) -> int:
        return math.prod(self.shape)


@dataclass
class BlockInfo:
    name: str  # e.g. "dit.blocks.7"
    component: str  # e.g. "dit"
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(t.params for t in self.tensors)

    @property
    def stored_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def bytes_as(self, fmt_name: str) -> int:
        return self.bytes_by_format((fmt_name,))[get_format(fmt_name).name]

    def bytes_by_format(self, fmt_names: Sequence[str]) -> dict[str, int]:
        """Bytes of the block stored in each of `fmt_names`, in one pass over its tensors (inspect sizes
        200,000 tensors in four formats: one loop instead of a generator and a sum per format)."""
        names = _canonical(tuple(fmt_names))
        sums = [0] * len(names)
        for t in self.tensors:
            for i, n in enumerate(sizes_in(t.shape, names)):
                sums[i] += n
        return dict(zip(names, sums, strict=True))

    @property
    def formats(self) -> list[str]:
        return sorted({t.format for t in self.tensors})


@dataclass
class Inventory:
    source: str  # path or model name
    blocks: list[BlockInfo]  # in first-seen (file or execution) order
    # (name, dtype, shape, bytes) of a checkpoint's tensors of dtypes residency does not store (I64 position
    # ids, masks, F64): in no block, no total
    left_out: list[tuple[str, str, tuple[int, ...], int]] = field(default_factory=list)
    note: str = ""  # how it was counted, where that is not the files' own tensors (a pipeline directory's configs)

    @property
    def tensors(self) -> list[TensorInfo]:
        return [t for b in self.blocks for t in b.tensors]

    @property
    def components(self) -> list[str]:
        seen: dict[str, None] = {}
        for b in self.blocks:
            seen.setdefault(b.component, None)
        return list(seen)

    def blocks_of(self, component: str) -> list[BlockInfo]:
        return [b for b in self.blocks if b.component == component]

    def by_component(self) -> dict[str, list[BlockInfo]]:
        """Blocks per component, components in first-seen order: one pass, where calling
        blocks_of for each component costs components × blocks."""
        out: dict[str, list[BlockInfo]] = {}
        for b in self.blocks:
            out.setdefault(b.component, []).append(b)
        return out

    @property
    def params(self) -> int:
        return sum(b.params for b in self.blocks)

    @property
    def stored_bytes(self) -> int:
        return sum(b.stored_bytes for b in self.blocks)

    def bytes_as(self, fmt_name: str) -> int:
        return sum(b.bytes_as(fmt_name) for b in self.blocks)

    def largest_block(self) -> BlockInfo | None:
        """The least that must fit on the device when everything else streams."""
        return max(self.blocks, key=lambda b: b.stored_bytes, default=None)


def block_of(name: str) -> tuple[str, str]:
    """(component, block) of a tensor name.

    The block ends at the first numeric path segment (`dit.blocks.7`); tensors outside
    numbered lists group by their first two segments (`dit.x_embed`).
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            block = ".".join(parts[: i + 1])
            component = parts[0] if i >= 2 else (parts[0] if i == 1 else "model")
            return component, block
    if len(parts) <= 2:
        return "model", parts[0]
    return parts[0], ".".join(parts[:2])


def group_tensors(source: str, tensors: Iterable[TensorInfo]) -> Inventory:
    """Tensors grouped by block (block_of), in the order blocks are first seen, except that the numbered blocks of
    one list (`layers.0`, `layers.1`, …) follow their numbers, at the place the list is first seen: a safetensors
    header lists names as text (layers.0, layers.1, layers.10, layers.11, layers.2), and the inspect table's
    ranges of like blocks read "layers.0–9 (×12)" for layers 0 to 11."""
    blocks: dict[str, BlockInfo] = {}
    for t in tensors:
        component, block = block_of(t.name)
        b = blocks.get(block)
        if b is None:
            b = blocks[block] = BlockInfo(block, component)
        b.tensors.append(t)
    first_seen: dict[str, int] = {}
    keys = {}
    for pos, name in enumerate(blocks):
        head, _, last = name.rpartition(".")
        numbered = bool(head) and last.isdigit()
        key = head if numbered else name
        keys[name] = (first_seen.setdefault(key, pos), int(last) if numbered else -1, pos)
    return Inventory(source, sorted(blocks.values(), key=lambda b: keys[b.name]))


def inventory_from_named_shapes(
    source: str, named: Iterable[tuple[str, Sequence[int], torch.dtype | str]]
) -> Inventory:
    """From (name, shape, dtype-or-format) triples, e.g. a module's meta-device parameters."""
    dtype_to_format = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    infos = []
    for name, shape, dtype in named:
        fmt_name = dtype if isinstance(dtype, str) else dtype_to_format.get(dtype, "F32")
        shape = tuple(int(d) for d in shape)
        infos.append(TensorInfo(name, shape, fmt_name, tensor_bytes(shape, FORMATS[fmt_name])))
    return group_tensors(source, infos)


def module_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Size, torch.dtype]]:
    """(name, shape, dtype) of a module's parameters and floating buffers (works on the meta device). Non-persistent
    buffers (a rope table computed at load) are in no checkpoint but in device memory, and a workload counted by
    workload_from_module holds them too (its loose block): counted, `inspect DIR` and `plan DIR` agree."""
    named = [(n, p.shape, p.dtype) for n, p in module.named_parameters()]
    return named + [(n, b.shape, b.dtype) for n, b in module.named_buffers() if b.is_floating_point()]


def inventory_from_module(source: str, module: torch.nn.Module) -> Inventory:
    """module_tensors of `module`, grouped by block: no memory needed."""
    return inventory_from_named_shapes(source, module_tensors(module))
