"""The host store: each block's weights packed once into one contiguous uint8 blob in its plan format.

Blobs are cached per block module (weakly) and format while a runtime is attached, so frames, sessions, a
recovery and a plan switch reuse them; the runtime's detach forgets them (HostStore.release): the user may then
change the weights in ways no token sees (an in-place edit through `.data` keeps the storage and the version
counter), and the host memory goes back.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

import residency.device.host_memory as host_ram  # looked up per call: tests patch host_ram.host_memory
from residency.errors import ResidencyError
from residency.formats import get_format
from residency.runtime import pack_loss
from residency.runtime.pack_loss import LossExcess
from residency.units import fmt_bytes
from residency.workload import BlockSpec

# Byte alignment a tensor's start needs so that it can be viewed as its element type in place.
_ALIGN_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "FP8": 4}
HOST_HEADROOM = 0.9  # use at most this fraction of the RAM available now (page cache, the interpreter)


class HostMemoryExceeded(ResidencyError):
    """The host store (plus, on the CPU backend, the device memory) does not fit in the RAM available."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in its block's host blob, and in which storage format."""
    name: str  # relative to the block module, as in the workload's tensors
    offset: int  # bytes from the start of the blob
    nbytes: int
    shape: tuple[int, ...]
    format: str  # the effective storage format (vectors and odd shapes fall back to BF16; own dtype kept)
    own_dtype: str | None = None  # "fp32" … for a tensor kept in its own dtype (stored, computed in it); None: the block's


@dataclass(frozen=True)
class BlobLayout:
    """The tensors of one block's blob, their offsets and the blob's size in bytes."""
    entries: tuple[TensorEntry, ...]  # in the workload's tensor order
    nbytes: int  # blob size, padding included
    padding_bytes: int  # alignment padding (0 for every format of the shipped models)


@dataclass(frozen=True)
class BlockBlob:
    """One block's weights packed in its planned storage format as one flat host buffer."""
    block: str
    format: str  # the plan's storage format for the block
    layout: BlobLayout
    data: torch.Tensor  # flat uint8, CPU, layout.nbytes long
    excess: tuple[LossExcess, ...] = ()  # tensors that lost far more when packed than the plan assumed

    @property
    def nbytes(self) -> int:
        """Blob size in bytes, padding included."""
        return self.layout.nbytes

    def repack(self, index: int, value: torch.Tensor) -> torch.Tensor:
        """Pack `value` into entry `index` (its layout order) in the entry's format; returns the packed bytes."""
        e = self.layout.entries[index]
        packed = get_format(e.format).pack(value)
        self.data[e.offset:e.offset + e.nbytes].copy_(packed)
        return packed


def blob_layout(spec: BlockSpec, fmt_name: str) -> BlobLayout:
    """Offsets of the block's tensors in its blob: most-aligned tensors first, so padding is rare."""
    items = []
    for (name, shape), eff in zip(spec.tensors, spec.stored_formats(get_format(fmt_name).name), strict=True):
        items.append((name, tuple(shape), eff.name, eff.nbytes(shape), _ALIGN_BYTES.get(eff.name, 1)))
    offsets: dict[str, int] = {}
    offset = padding = 0
    for name, _, _, nbytes, align in sorted(items, key=lambda it: -it[4]):
        pad = -offset % align
        offset += pad
        padding += pad
        offsets[name] = offset
        offset += nbytes
    entries = tuple(TensorEntry(name, offsets[name], nbytes, shape, eff, own)
                    for (name, shape, eff, nbytes, _), own in zip(items, spec.tensor_own_dtypes, strict=True))
    return BlobLayout(entries, offset, padding)


def block_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """A block's parameter or persistent buffer by its relative name."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        return owner._parameters[attr]
    if attr in owner._buffers:
        return owner._buffers[attr]
    raise ResidencyError(f"block has no tensor {name!r}", hint="the workload does not describe this model")


def pack_block(block: str, module: nn.Module, spec: BlockSpec, fmt_name: str,
               tensors: dict[str, torch.Tensor] | None = None) -> BlockBlob:
    """Quantize every tensor of the block with its effective format into one blob (host, seconds for K-quants)."""
    layout = blob_layout(spec, fmt_name)
    blob = BlockBlob(block, fmt_name, layout, torch.zeros(layout.nbytes, dtype=torch.uint8))
    excess = []
    for i, e in enumerate(layout.entries):
        weight = tensors[e.name] if tensors is not None else block_tensor(module, e.name)
        if tuple(weight.shape) != e.shape:
            raise ResidencyError(f"block {block}: tensor {e.name} has shape {tuple(weight.shape)}, the workload "
                                 f"says {e.shape}", hint="the plan's workload does not describe this model")
        packed = blob.repack(i, weight)
        if e.own_dtype is None:
            found = pack_loss.measure(block, e.name, e.format, weight, packed)
            if found is not None:
                excess.append(found)
    return dataclasses.replace(blob, excess=tuple(excess)) if excess else blob


# block module -> {(workload fingerprint, format): (weights token, blob)}; an entry dies with its model.
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str], tuple[tuple, BlockBlob]]] = (
    weakref.WeakKeyDictionary())


def clear_host_cache() -> None:
    """Drop every cached blob (they are otherwise kept as long as their model lives)."""
    _CACHE.clear()


def _weights_token(tensors: dict[str, torch.Tensor]) -> tuple:
    # Storage address and version counter (shared by detach(), not by .data): an in-place weight
    # update (load_state_dict, copy_) changes it.
    return tuple((n, t.data_ptr(), t._version) for n, t in sorted(tensors.items()))


class HostStore:
    """The blobs of one attach: block name -> BlockBlob, built from the cache or packed now."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint
        self.blobs: dict[str, BlockBlob] = {}
        self.packed_now_bytes = 0  # bytes packed by this attach (0 on a warm re-attach: a recovery, a switch)
        self.reused_bytes = 0
        self._modules: list[nn.Module] = []  # whose cache entries release() forgets

    def build(self, wanted: list[tuple[str, nn.Module, BlockSpec, str, dict[str, torch.Tensor]]],
              extra_host_bytes: int = 0, host_budget_bytes: int | None = None,
              ready: Mapping[tuple[str, str], BlockBlob] | None = None) -> None:
        """Pack (or reuse) one blob per (block, module, spec, format, original tensors).

        `extra_host_bytes` is other host memory the attach will take (on the CPU backend, the plan's
        predicted peak device bytes); all of it is checked against the RAM available before anything
        is packed. `ready`: (block, format) -> blobs packed already (a re-plan packs on a background thread);
        they are used as they are and cached.
        """
        todo = []
        self._modules += [module for _, module, _, _, _ in wanted]
        for block, module, spec, fmt, tensors in wanted:
            if ready and (block, fmt) in ready:
                blob = ready[(block, fmt)]
                _CACHE.setdefault(module, {})[(self.fingerprint, fmt)] = (_weights_token(tensors), blob)
                self.blobs[block] = blob
                self.reused_bytes += blob.nbytes
                continue
            hit = _CACHE.get(module, {}).get((self.fingerprint, fmt))
            if hit is not None and hit[0] == _weights_token(tensors):
                self.blobs[block] = hit[1]
                self.reused_bytes += hit[1].nbytes
            else:
                todo.append((block, module, spec, fmt, tensors))
        store = sum(blob_layout(spec, fmt).nbytes for _, _, spec, fmt, _ in todo)
        available = host_ram.host_memory().available_bytes * HOST_HEADROOM
        if host_budget_bytes is not None:
            available = min(available, host_budget_bytes)
        if store + extra_host_bytes > available:
            extra = f" and {fmt_bytes(extra_host_bytes)} of device memory in RAM" if extra_host_bytes else ""
            raise HostMemoryExceeded(
                f"the host store needs {fmt_bytes(store)}{extra}: {fmt_bytes(store + extra_host_bytes)} of RAM, "
                f"{fmt_bytes(available)} is available ({HOST_HEADROOM:.0%} of MemAvailable or of the cgroup "
                "memory.max, whichever is lower)",
                hint="close other programs or raise the container's memory limit"
                     + (" (on the CPU backend device memory is RAM too: a smaller budget, --vram or "
                        "attach(vram=…), holds less of it)" if extra_host_bytes else ""))
        excess = []
        for block, module, spec, fmt, tensors in todo:
            blob = pack_block(block, module, spec, fmt, tensors)
            _CACHE.setdefault(module, {})[(self.fingerprint, fmt)] = (_weights_token(tensors), blob)
            self.blobs[block] = blob
            self.packed_now_bytes += blob.nbytes
            excess += blob.excess
        pack_loss.warn_excess(excess + [e for blob in (ready or {}).values() for e in blob.excess
                                        if self.blobs.get(blob.block) is blob])

    def release(self) -> None:
        """Forget every blob of this workload cached on the modules this store packed or reused, and its own:
        called when the runtime detaches (a later attach packs again, from the weights as they are then)."""
        for module in self._modules:
            entries = _CACHE.get(module)
            if entries is None:
                continue
            for key in [k for k in entries if k[0] == self.fingerprint]:
                del entries[key]
            if not entries:
                _CACHE.pop(module, None)
        self._modules = []
        self.blobs = {}

    @property
    def nbytes(self) -> int:
        """Host bytes all blobs take together."""
        return sum(b.nbytes for b in self.blobs.values())
