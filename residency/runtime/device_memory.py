"""Device memory of one attach: resident buffers, a phase arena, slots and dequant scratch, made once.

Each block gets bindings: parameter views into those buffers plus the per-call dequant that fills them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from residency.formats import get_format
from residency.formats.dtypes import COMPUTE_DTYPE_BYTES, DTYPE_FORMAT, TORCH_DTYPES
from residency.formats.staging import StagedUnpack
from residency.plan import BlockPlan, Plan
from residency.runtime.backend import Backend, LoadRecipe
from residency.runtime.graphed import graph_pool_reserve_bytes
from residency.runtime.host_store import BlockBlob
from residency.runtime.ledger import Ledger
from residency.simulate.memory import (
    ARENA_ALIGN_BYTES,
    GPU_WORKSPACE_BYTES,
    dequant_threads,
    needs_staging,
    thread_staging_bytes,
)
from residency.units import fmt_bytes
from residency.workload import Workload


@dataclass
class Binding:
    """What makes a block computable from one place in device memory."""

    views: tuple[torch.Tensor, ...]  # what each of the block's tensors' .data becomes, workload order
    unpacks: tuple = ()  # (format, packed view, scratch view): per-call dequant on the compute side
    dequant_weights: int = 0  # weights the unpacks produce (telemetry)
    packed: tuple[torch.Tensor, ...] = ()  # a packed binding: each tensor's packed bytes on the device

    @functools.cached_property
    def storages(self) -> frozenset[int]:
        """Addresses of the storages the views live in (a slot, the arena, the scratch): an output of the
        block that is a view of one of them is overwritten when that memory is reused."""
        return frozenset(v.untyped_storage().data_ptr() for v in self.views)


def _kind(bp: BlockPlan) -> str:
    return "resident" if bp.placement == "resident" else "resident_quantized"


def compute_bytes(blob: BlockBlob, compute_dtype: str) -> int:
    """Bytes the block's tensors take unpacked in `compute_dtype`, a tensor of its own dtype in that (KeyError
    for an unknown dtype)."""
    return sum(math.prod(e.shape) * COMPUTE_DTYPE_BYTES[e.own_dtype or compute_dtype] for e in blob.layout.entries)


def compute_offsets(blob: BlockBlob, compute_dtype: str) -> tuple[int, ...]:
    """Byte offset of each entry's unpacked tensor in a buffer of compute_bytes, entry order: wider elements
    first, so each starts aligned to its element size with no padding (a float32 view of uint8 bytes needs
    an offset divisible by 4; all entries are one width unless some keep their own dtype)."""
    sizes = [COMPUTE_DTYPE_BYTES[e.own_dtype or compute_dtype] for e in blob.layout.entries]
    offsets, offset = [0] * len(sizes), 0
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):  # stable: one width keeps entry order
        offsets[i] = offset
        offset += math.prod(blob.layout.entries[i].shape) * sizes[i]
    return tuple(offsets)


def lands_as_is(blob: BlockBlob, compute_dtype: str) -> bool:
    """True when the blob's bytes already are the block's unpacked tensors, at the offsets its compute views
    use (every entry in the compute dtype or kept in its own, no padding): its load is one whole-blob copy,
    with no device staging and no per-tensor pass."""
    direct = DTYPE_FORMAT[compute_dtype]
    entries = blob.layout.entries
    return (all(e.format == direct or e.own_dtype is not None for e in entries)
            and blob.nbytes == compute_bytes(blob, compute_dtype)
            and all(e.offset == o for e, o in zip(entries, compute_offsets(blob, compute_dtype), strict=True)))


def _unpacked_at_load(bp: BlockPlan) -> bool:
    """Resident blocks and blocks streamed with dequant on the copy side land in the compute dtype."""
    return bp.placement == "resident" or (bp.placement == "streamed" and bp.dequant_on == "copy")


def _needs_unpack(blob: BlockBlob, compute_dtype: str) -> list:
    """Entries that cannot be viewed in place as the compute dtype (quantized, or another float type); an
    entry of its own dtype is stored in it and viewed in place."""
    direct = DTYPE_FORMAT[compute_dtype]
    return [e for e in blob.layout.entries if e.own_dtype is None and e.format != direct]


class DeviceMemory:
    """Sizes, reserves (ledger first), allocates and binds; never allocates after construction."""

    def __init__(self, backend: Backend, ledger: Ledger, workload: Workload, plan: Plan,
                 blobs: dict[str, BlockBlob]):
        self.backend, self.ledger, self.plan, self.blobs = backend, ledger, plan, blobs
        self.dtype_of = {bp.name: TORCH_DTYPES[bp.compute_dtype] for bp in plan.blocks}
        streamed = plan.streamed()
        # --- sizes, from the same blobs the loads will move ---
        self.slot_bytes = max((self._landed_bytes(bp) for bp in streamed), default=0)
        self.slot_count = plan.execution.slots if streamed else 0
        per_call, _ = dequant_threads(plan)
        self.scratch_bytes = max((sum(math.prod(e.shape) for e in _needs_unpack(blobs[bp.name], bp.compute_dtype))
                                  * COMPUTE_DTYPE_BYTES[bp.compute_dtype] for bp in per_call), default=0)
        # Every load that unpacks on the device stages its blob first: those the simulator counts
        # (needs_staging) and any other that does not land as is — a short staging would be sliced silently.
        on_device_unpack = [self.blobs[bp.name].nbytes for bp in plan.blocks if needs_staging(bp) or (
            _unpacked_at_load(bp) and not lands_as_is(self.blobs[bp.name], bp.compute_dtype))]
        self.staging_bytes = backend.unpack_staging_bytes(max(on_device_unpack, default=0))
        # Dequant staging per thread: the compute side (per-call dequant) and the copy worker (unpack at load).
        self.compute_staging_bytes, self.copy_staging_bytes = (
            thread_staging_bytes(workload, side, backend.device.type) for side in dequant_threads(plan))
        self.session_bytes = {bp.name: self._held_bytes(bp) for bp in plan.blocks
                              if bp.placement != "streamed" and bp.lifetime == "session"}
        self.phase_layout, self.arena_bytes, arena_split = self._phase_layouts(workload)
        self.kv_bytes = workload.kv_cache_bytes(plan.kv_dtype)
        self.activation_bytes = max((workload.by_name[bp.name].activation_bytes(bp.compute_dtype, workload.batch)
                                     for bp in plan.blocks), default=0)
        self.workspace_bytes = GPU_WORKSPACE_BYTES if backend.device.type == "cuda" else 0
        # Graphed blocks' pools: held for the attach, as the simulator counts them (its prediction's figure).
        self.graph_pool_bytes = graph_pool_reserve_bytes(workload, plan)
        kinds = {"resident": arena_split[0], "resident_quantized": arena_split[1],
                 "slots": self.slot_count * self.slot_bytes,
                 "dequant_scratch": (self.scratch_bytes + self.staging_bytes
                                     + self.compute_staging_bytes + self.copy_staging_bytes),
                 "kv_cache": self.kv_bytes, "activations": self.activation_bytes,
                 "workspace": self.workspace_bytes, "graph_pool": self.graph_pool_bytes}
        for name, n in self.session_bytes.items():
            kinds[_kind(plan.by_name[name])] += n
        self.reserved = kinds
        total = sum(kinds.values())
        if total > ledger.budget_bytes:  # refuse before allocating anything, with the whole picture
            ledger.reserve("resident", total, f"the plan ({', '.join(f'{k} {fmt_bytes(v)}' for k, v in kinds.items() if v)})")
        for kind, n in kinds.items():
            ledger.reserve(kind, n, kind)
        # --- allocation: once, here ---
        self.session = {name: backend.alloc(n) for name, n in self.session_bytes.items()}
        self.arena = backend.alloc(self.arena_bytes) if self.arena_bytes else None
        self.slots = [backend.alloc(self.slot_bytes) for _ in range(self.slot_count)]
        self.scratch = backend.alloc(self.scratch_bytes) if self.scratch_bytes else None
        if self.staging_bytes:
            backend.set_unpack_staging(backend.alloc(self.staging_bytes))
        # Hazard: the compute thread and the copy worker dequantize at once; one shared staging would
        # be overwritten mid-chunk, so each side gets its own.
        self.compute_staging = self._alloc_staging(self.compute_staging_bytes)
        self.copy_staging = self._alloc_staging(self.copy_staging_bytes)

    # --- sizes ---
    def _landed_bytes(self, bp: BlockPlan) -> int:
        """Bytes a streamed block takes in a slot: its blob, or its compute-dtype weights if unpacked on copy."""
        blob = self.blobs[bp.name]
        return compute_bytes(blob, bp.compute_dtype) if bp.dequant_on == "copy" else blob.nbytes

    def _held_bytes(self, bp: BlockPlan) -> int:
        blob = self.blobs[bp.name]
        return compute_bytes(blob, bp.compute_dtype) if bp.placement == "resident" else blob.nbytes

    def _phase_layouts(self, workload: Workload):
        """Per phase: offsets of its phase-lifetime blocks in one arena sized by the worst phase."""
        layout: dict[str, dict[str, int]] = {}
        worst, split = 0, (0, 0)
        for ph in workload.phases:
            offset, res, rq = 0, 0, 0
            layout[ph.name] = {}
            for name in ph.blocks:
                bp = self.plan.by_name[name]
                if bp.placement == "streamed" or bp.lifetime != "phase":
                    continue
                offset += -offset % ARENA_ALIGN_BYTES  # as simulate.memory.phase_arena_bytes
                layout[ph.name][name] = offset
                n = self._held_bytes(bp)
                offset += n
                res, rq = (res + n, rq) if bp.placement == "resident" else (res, rq + n)
            if offset > worst:
                worst, split = offset, (offset - rq, rq)  # alignment padding is counted as resident
        return layout, worst, split

    def _alloc_staging(self, nbytes: int) -> torch.Tensor | None:
        if not nbytes:
            return None
        buf = self.backend.alloc(nbytes)
        # CPU: fault its pages in now, not in the first dequant. Not on a GPU, where memory needs no
        # first touch and a zero_ on the default stream would race the copy stream's first chunk.
        return buf.zero_() if buf.device.type == "cpu" else buf

    def _staged(self, fmt_name: str, staging: torch.Tensor | None):
        fmt = get_format(fmt_name)
        # the runtime's own blobs and views: unpacked without unpack()'s argument checks (~2 µs a call)
        return StagedUnpack(fmt, staging if fmt.uses_staging else None)

    # --- views ---
    def _compute_views(self, name: str, base: torch.Tensor) -> tuple[torch.Tensor, ...]:
        blob, compute = self.blobs[name], self.plan.by_name[name].compute_dtype
        views = []
        for e, offset in zip(blob.layout.entries, compute_offsets(blob, compute), strict=True):
            dtype = TORCH_DTYPES[e.own_dtype or compute]
            n = math.prod(e.shape) * COMPUTE_DTYPE_BYTES[e.own_dtype or compute]
            views.append(base[offset:offset + n].view(dtype).view(e.shape))
        return tuple(views)

    def _packed_binding(self, name: str, base: torch.Tensor) -> Binding:
        """Views into a packed blob on the device: in place where the format is the compute dtype (or the
        tensor's own dtype, kept in it), else a dequant into the scratch before each call."""
        bp = self.plan.by_name[name]
        dtype, direct = self.dtype_of[name], DTYPE_FORMAT[bp.compute_dtype]
        size = COMPUTE_DTYPE_BYTES[bp.compute_dtype]
        views, unpacks, s_off, weights, regions = [], [], 0, 0, []
        for e in self.blobs[name].layout.entries:
            packed = base[e.offset:e.offset + e.nbytes]
            regions.append(packed)
            if e.own_dtype is not None:  # stored in its own dtype (blob_layout), computed in it
                views.append(packed.view(TORCH_DTYPES[e.own_dtype]).view(e.shape))
                continue
            if e.format == direct:
                views.append(packed.view(dtype).view(e.shape))
                continue
            n = math.prod(e.shape)
            out = self.scratch[s_off:s_off + n * size].view(dtype).view(e.shape)
            s_off += n * size
            unpacks.append((self._staged(e.format, self.compute_staging), packed, out))
            views.append(out)
            weights += n
        return Binding(tuple(views), tuple(unpacks), weights, tuple(regions))

    def binding(self, name: str, base: torch.Tensor) -> Binding:
        """The block computed from `base` (its own buffer, its arena region, or a slot)."""
        bp = self.plan.by_name[name]
        return Binding(self._compute_views(name, base)) if _unpacked_at_load(bp) else self._packed_binding(name, base)

    def recipe(self, name: str, base: torch.Tensor, label: str) -> LoadRecipe:
        """The load that fills `base` for the block: a whole-blob copy, or an unpack into compute dtype."""
        bp = self.plan.by_name[name]
        blob = self.blobs[name]
        if not _unpacked_at_load(bp) or lands_as_is(blob, bp.compute_dtype):
            return self.backend.make_recipe(label, blob.data, base, [], 0)
        direct = DTYPE_FORMAT[bp.compute_dtype]
        items = list(zip(blob.layout.entries, self._compute_views(name, base), strict=True))
        # plain copies first (timed as copy): the compute dtype's, and a tensor's kept in its own dtype
        items.sort(key=lambda it: not (it[0].format == direct or it[0].own_dtype is not None))
        plain = sum(e.format == direct or e.own_dtype is not None for e, _ in items)
        return self.backend.make_recipe(label, blob.data, None,
                                        [(self._staged(e.format, self.copy_staging), e.offset, e.nbytes, v)
                                         for e, v in items], plain)

    def arena_region(self, phase: str, name: str) -> torch.Tensor:
        """The arena from the offset of block `name` in `phase`'s layout to its end (uint8)."""
        return self.arena[self.phase_layout[phase][name]:]

    def release(self) -> None:
        """Drop every buffer (freed when the last view goes) and the ledger's reservations."""
        self.session.clear()
        self.slots.clear()
        self.arena = self.scratch = self.compute_staging = self.copy_staging = None
        for kind, n in self.reserved.items():
            self.ledger.release(kind, n)
        self.reserved = {}
