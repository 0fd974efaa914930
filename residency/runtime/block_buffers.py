"""A block's buffers (a running state, a cache) kept while the memory it computes from is reused.

The executor sees a block's own in-place writes through version counters and parks a volatile block's buffers on
their own storage between calls (executor.py); what lands in host blobs and the model's tensors is done here.
Rare work (a stateful block): a pack of the buffer, never of a weight, which does not change while attached.
"""

from __future__ import annotations

import torch
from torch import nn

from residency.runtime.device_memory import Binding
from residency.runtime.executor import Executor, version_of
from residency.runtime.host_store import BlockBlob

Originals = dict[str, tuple[tuple[torch.Tensor, torch.Tensor], ...]]  # block -> (live tensor, own data) each


def keep_write(blob: BlockBlob, original: torch.Tensor, index: int, bound: torch.Tensor, binding: Binding) -> None:
    """Buffer `index` of a block was updated in place in memory that is reused: into the host blob (the next
    load carries it), into the block's packed bytes on the device when it is resident there, and into the
    model's own tensor (detach gives it back)."""
    value = bound.detach()
    packed = blob.repack(index, value)
    if binding.packed:
        binding.packed[index].copy_(packed.to(binding.packed[index].device))
    original.copy_(value.to(original.device, original.dtype))


def keep_resident_writes(executor: Executor, originals: Originals, versions: dict[str, tuple[int, ...]]) -> None:
    """Buffers of blocks whose memory was never reused, updated in place while attached (`versions`: theirs
    at attach): copied into the model's own tensors before those are put back (a volatile block's writes were
    kept as they happened)."""
    for name, binding in executor.session_binding.items():
        if binding.unpacks:  # its views are the scratch: kept as they happened
            continue
        for i, v in zip(executor.buffer_index[name], versions.get(name, ()), strict=True):
            t, original = originals[name][i]
            if version_of(t) != v:
                original.copy_(t.detach().to(original.device, original.dtype))


def refresh(ready: dict[tuple[str, str], BlockBlob], originals: Originals) -> None:
    """Blobs packed ahead of a switch (prepack, on another thread) hold the buffers as they were then: a block
    that updates one in place has moved on since. Its buffers are packed again from the model's tensors as
    the detach left them."""
    for (name, _fmt), blob in ready.items():
        for i, (t, data) in enumerate(originals.get(name, ())):
            if not isinstance(t, nn.Parameter):
                blob.repack(i, data)
