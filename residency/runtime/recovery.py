"""Recovery from running out of device memory: restore the session's state, re-plan smaller, re-attach.

A step is retried from a snapshot (RNG, cache indices, the KV slot the commit overwrites), so no state is lost.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

OOM_SHRINK = 0.9  # after a real out-of-memory, plan for 90 % of what was held
MAX_RECOVERIES = 4  # per step; each one re-plans for a smaller budget


@dataclass
class SessionSnapshot:
    """What a failed step may have changed, taken before it."""

    rng_state: torch.Tensor
    slot_frames: list[int]
    count: int
    current_frame: int
    frame_index: int
    last_latent: torch.Tensor
    victim: int  # KV slot the step's cache-write pass overwrites (-1: an empty slot, nothing to keep)


# cache -> host copies of one KV slot per layer (keys then values), reused every step of the session.
_BACKUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _backup(cache) -> list[torch.Tensor]:
    bufs = _BACKUPS.get(cache)
    if bufs is None:
        pin = cache.keys[0].device.type == "cuda"
        bufs = [torch.empty_like(t[:, :, 0], device="cpu", pin_memory=pin) for t in cache.keys + cache.values]
        _BACKUPS[cache] = bufs
    return bufs


def take_snapshot(session, protect_kv: bool = True) -> SessionSnapshot:
    """Before a step. Cost: the indices, plus one KV slot of every layer when the window is full
    (1/context_frames of the cache, copied device->host asynchronously on the compute stream)."""
    cache = session.cache
    victim = cache.slot_for(cache.current_frame)
    occupied = cache.slot_frames[victim] >= 0
    if protect_kv and occupied:
        for buf, t in zip(_backup(cache), cache.keys + cache.values, strict=True):
            buf.copy_(t[:, :, victim], non_blocking=True)
    return SessionSnapshot(session.generator.get_state(), list(cache.slot_frames), cache.count,
                           cache.current_frame, session.frame_index, session.last_latent,
                           victim if protect_kv and occupied else -1)


def restore(session, snap: SessionSnapshot) -> None:
    """Undo a failed step: the session is exactly as before it (the partial commit is rolled back)."""
    cache = session.cache
    if snap.victim >= 0:
        if cache.keys[0].device.type == "cuda":
            torch.cuda.synchronize(cache.keys[0].device)  # recovery only: the async backup must have landed
        for buf, t in zip(_backup(cache), cache.keys + cache.values, strict=True):
            t[:, :, snap.victim].copy_(buf)
    session.generator.set_state(snap.rng_state)
    cache.slot_frames = list(snap.slot_frames)
    cache.count = snap.count
    cache._write_slot = None
    cache._set_current(snap.current_frame)  # rebuilds the RoPE table for the restored window
    session.frame_index = snap.frame_index
    session.last_latent = snap.last_latent


def recovery_budget(cause: BaseException, budget_bytes: int, held_bytes: int, device: torch.device) -> int:
    """The budget to re-plan for: the cut itself, or, after a real OOM, less than was held."""
    from residency.runtime.ledger import DeviceBudgetExceeded

    if isinstance(cause, DeviceBudgetExceeded):
        return budget_bytes
    budget = int(min(budget_bytes, held_bytes) * OOM_SHRINK)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)  # other programs' use shows here
        budget = min(budget, int((free + held_bytes) * OOM_SHRINK))
    return budget
