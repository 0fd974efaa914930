"""The per-block temporal KV cache: an anchor slot plus a ring of recent latent frames.

Slot 0 holds the anchor (the start image's frame) forever; frames 1, 2, … fill slots
1..S-1 and then overwrite the oldest intermediate frame — O(1), nothing is shifted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from pipelines.world_model.config import WorldModelConfig
from pipelines.world_model.temporal_rope import relative_position, rope_tables, rotate_

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class CacheSnapshot:
    """The cache's indices before a step, and which slot's contents its backup holds."""

    slot_frames: tuple[int, ...]
    count: int
    current_frame: int
    victim: int  # slot the step's commit overwrites, kept in the cache's backup (-1: empty slot, nothing kept)
    generation: int  # the backup holds this snapshot's victim only while no later snapshot was taken


class LayerKV:
    """One DiT block's view of the cache (a LayerContext): that block's K and V stores and the shared cache.

    Made once per layer when the cache is built, so a block receives the same object every call and the
    layer index never reaches the block's code: a compiled block (torch.compile) then sees one set of guards
    for every layer instead of one per layer index.
    """

    def __init__(self, cache: KVCache, keys: torch.Tensor, values: torch.Tensor):
        self.cache = cache
        self.keys = keys  # (B, heads, slots, tokens, head_dim), storage dtype
        self.values = values

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """KVCache.attend_layer on this layer's stores; q, k, v (B, heads, tokens, head_dim), returns like q."""
        return self.cache.attend_layer(self.keys, self.values, q, k, v)

    def capture_key(self) -> tuple[int, bool]:
        """The Python values a captured block graph (residency.runtime.graphed) bakes in when it reads this
        context: the window's fill and whether a commit is running. Everything else it reads is a tensor made
        once (this layer's stores, the cache's scratch, RoPE tables and write-slot index)."""
        return self.cache.count, self.cache._writing


class KVCache:
    """K and V of `context_frames` latent frames for every DiT block; implements TemporalContext.

    K is stored un-rotated: RoPE is applied on read with positions relative to the frame
    being generated, so eviction re-indexes positions by rewriting an S-row table, not memory.
    Reads copy the window into a compute-dtype scratch shared by all blocks (upcast + rotate
    in one pass): O(S·T·dim) elementwise per block per pass, ~1/T of the attention FLOPs.

    Capture-safe reads and writes (torch.compile, CUDA graphs): a block reaches its stores through its
    LayerKV, never by a layer index; the slot a commit writes is a device tensor (`_slot_index`), not a
    Python int, so the ring's rotation changes no traced constant. What a traced block does depend on is
    (count, writing): count is 0..S while the window fills and S once it is full, writing tells a commit
    pass from a denoise pass, so the set of shapes is fixed and, with a full window, one per pass kind.
    """

    def __init__(
        self,
        config: WorldModelConfig,
        batch: int = 1,
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype = torch.float32,
    ):
        c = config
        self.config = config
        self.slots = c.context_frames
        self.tokens = c.tokens_per_frame
        self.storage_dtype = c.kv_storage_dtype
        shape = (batch, c.heads, self.slots, self.tokens, c.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.storage_dtype, device=device) for _ in range(c.depth)]
        self.values = [torch.zeros(shape, dtype=self.storage_dtype, device=device) for _ in range(c.depth)]
        # Scratch: the window plus the current frame, in compute dtype (activation memory).
        window = (batch, c.heads, (self.slots + 1) * self.tokens, c.head_dim)
        self._k_read = torch.empty(window, dtype=compute_dtype, device=device)
        self._v_read = torch.empty(window, dtype=compute_dtype, device=device)
        self._half = torch.empty(shape[:-1] + (c.head_dim // 2,), dtype=compute_dtype, device=device)
        self._cos = torch.ones(self.slots, 1, c.head_dim // 2, dtype=compute_dtype, device=device)
        self._sin = torch.zeros(self.slots, 1, c.head_dim // 2, dtype=compute_dtype, device=device)
        self.slot_frames: list[int] = [-1] * self.slots  # frame index held by each slot, -1 = empty
        self.count = 0  # valid slots; always the prefix [0, count)
        self.current_frame = 0  # the frame that reads (and a commit) are for
        self._write_slot: int | None = None
        # A commit is in progress: a bool, not `_write_slot is not None`, so a traced block guards on it and
        # not on the slot's value (which would compile once per ring slot).
        self._writing = False
        self._slot_index = torch.zeros(1, dtype=torch.long, device=device)  # _write_slot as a device tensor
        self.layers = [LayerKV(self, k, v) for k, v in zip(self.keys, self.values, strict=True)]
        self._backup: list[torch.Tensor] = []  # host copy of one slot per layer (keys, then values); made once
        self._generation = 0  # snapshots taken

    # --- policy ---
    def slot_for(self, frame: int) -> int:
        """Anchor -> slot 0; frame m >= 1 -> ring slot 1 + (m-1) mod (S-1), evicting frame m-(S-1)."""
        return 0 if frame == 0 else 1 + (frame - 1) % (self.slots - 1)

    def window(self) -> list[int]:
        """Frame indices held, oldest first (anchor first)."""
        return sorted(f for f in self.slot_frames if f >= 0)

    @property
    def nbytes(self) -> int:
        """Bytes the cache's key and value tensors take on their device."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # --- writes: a commit pass stores the K/V every block computes for `frame` ---
    def begin_write(self, frame: int) -> int:
        """Start committing `frame`'s K/V; returns the slot it will take.

        Raises ValueError when `frame` is not the frame the cache expects next.
        """
        if frame != self.current_frame:
            raise ValueError(f"commit of frame {frame} while the cache expects frame {self.current_frame}")
        self._write_slot = self.slot_for(frame)
        self._slot_index.fill_(self._write_slot)  # a device-side write (a kernel on a GPU), no host sync
        self._writing = True
        return self._write_slot

    def end_write(self) -> None:
        """Finish the commit: the slot now holds the current frame, and the next frame becomes current."""
        slot, self._write_slot, self._writing = self._write_slot, None, False
        self.slot_frames[slot] = self.current_frame
        self.count = min(self.count + 1, self.slots)
        self._set_current(self.current_frame + 1)

    def clear(self) -> None:
        """Forget every frame (slots are kept allocated, not zeroed); the next frame is 0."""
        self.slot_frames = [-1] * self.slots
        self.count = 0
        self._write_slot, self._writing = None, False
        self._set_current(0)

    def truncate_to_anchor(self) -> None:
        """Forget every generated frame, keep the anchor (session reset): no recompute needed."""
        if self.slot_frames[0] != 0:
            raise ValueError("no anchor frame in the cache")
        self.slot_frames = [0] + [-1] * (self.slots - 1)
        self.count = 1
        self._write_slot, self._writing = None, False
        self._set_current(1)

    # --- snapshot / restore (a failed step is undone; residency.runtime.session_protocol) ---
    def snapshot(self, protect_kv: bool = True) -> CacheSnapshot:
        """Before a step. Cost: the indices, plus one KV slot of every layer when the window is full
        (1/context_frames of the cache, copied device->host asynchronously on the compute stream into a
        backup allocated on the first full window and reused). protect_kv=False skips that copy: a step
        that fails after its commit began then cannot be undone."""
        victim = self.slot_for(self.current_frame)
        keep = protect_kv and self.slot_frames[victim] >= 0
        if keep:
            for buf, t in zip(self._backup_buffers(), self.keys + self.values, strict=True):
                buf.copy_(t[:, :, victim], non_blocking=True)
        self._generation += 1
        return CacheSnapshot(tuple(self.slot_frames), self.count, self.current_frame, victim if keep else -1,
                             self._generation)

    def restore(self, snap: CacheSnapshot) -> None:
        """The cache exactly as at `snap` (a partial commit rolled back); only the latest snapshot restores."""
        if snap.victim >= 0:
            if snap.generation != self._generation:
                raise ValueError("the KV backup was overwritten by a later snapshot; restore the latest one")
            if self.keys[0].device.type == "cuda":
                torch.cuda.synchronize(self.keys[0].device)  # recovery only: the async backup must have landed
            for buf, t in zip(self._backup, self.keys + self.values, strict=True):
                t[:, :, snap.victim].copy_(buf)
        self.slot_frames = list(snap.slot_frames)
        self.count = snap.count
        self._write_slot, self._writing = None, False
        self._set_current(snap.current_frame)  # rebuilds the RoPE table for the restored window

    def _backup_buffers(self) -> list[torch.Tensor]:
        if not self._backup:
            pin = self.keys[0].device.type == "cuda"
            self._backup = [torch.empty_like(t[:, :, 0], device="cpu", pin_memory=pin)
                            for t in self.keys + self.values]
        return self._backup

    def _set_current(self, frame: int) -> None:
        self.current_frame = frame
        if self.count == 0:
            return
        positions = torch.tensor(
            [relative_position(frame, f, self.slots) for f in self.slot_frames[: self.count]]
        )
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta, self._cos.dtype)
        self._cos[: self.count].copy_(cos)
        self._sin[: self.count].copy_(sin)

    # --- reads (TemporalContext) ---
    def layer(self, layer: int) -> LayerKV:
        """The view of block `layer` (0-based), made at construction: what that block's attention reads."""
        return self.layers[layer]

    def attend_layer(self, keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> torch.Tensor:
        """Attention of the current frame's q to the cached frames (rotated) and its own k, v.

        keys, values: one layer's stores (LayerKV); q, k, v: (B, heads, tokens, head_dim); returns like q.
        During a write (begin_write) also stores k, v in the write slot, after reading. Cost: copies the
        window's K/V into a read buffer per call.
        """
        n, t = self.count, self.tokens
        k_all = self._k_read[:, :, : (n + 1) * t]
        v_all = self._v_read[:, :, : (n + 1) * t]
        if n:
            k_win = k_all[:, :, : n * t].unflatten(2, (n, t))
            k_win.copy_(keys[:, :, :n])
            rotate_(k_win, self._half[:, :, :n], self._cos[:n], self._sin[:n])
            v_all[:, :, : n * t].unflatten(2, (n, t)).copy_(values[:, :, :n])
        k_all[:, :, n * t :].copy_(k)  # the current frame sits at position 0: no rotation
        v_all[:, :, n * t :].copy_(v)
        out = F.scaled_dot_product_attention(q, k_all, v_all)
        if self._writing:
            # After the read above: when full, the slot written is the victim still being read.
            self._store(keys, k)
            self._store(values, v)
        return out

    def _store(self, store: torch.Tensor, x: torch.Tensor) -> None:
        """x (B, heads, tokens, head_dim) into slot `_slot_index` of `store`: an index_copy_ by a device
        tensor, so the slot is no traced constant (the same rounding as a slice copy_ into the store)."""
        if self.storage_dtype == torch.float8_e4m3fn:
            x = x.clamp(-FP8_MAX, FP8_MAX)  # e4m3fn has no inf: out-of-range would become NaN
            # index_copy_ has no float8 kernel on the CPU: copy the converted bytes instead.
            store.view(torch.uint8).index_copy_(2, self._slot_index, x.to(store.dtype).view(torch.uint8)[:, :, None])
            return
        store.index_copy_(2, self._slot_index, x.to(store.dtype)[:, :, None])
