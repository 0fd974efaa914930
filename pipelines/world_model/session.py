"""A playable session: one start image, then one latent frame per keyboard action.

Holds the KV cache and a torch.Generator, so the same seed and actions give the same frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipelines.world_model.kv_cache import CacheSnapshot, KVCache
from pipelines.world_model.sampler import sample, timesteps
from residency.errors import ResidencyError

if TYPE_CHECKING:
    from pipelines.world_model.pipeline import WorldModelPipeline


def image_to_tensor(image: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """HxWx3 uint8 -> (1, 3, H, W) float32 in [-1, 1]. A wrong size is an error, never a resize.

    Resizing would pick an aspect-ratio policy (stretch, crop, letterbox) for the caller.
    """
    if isinstance(image, np.ndarray):
        # a read-only array (np.asarray of a PIL image) is copied: torch warns of viewing one, and only reads it
        tensor = torch.from_numpy(np.ascontiguousarray(image) if image.flags.writeable else np.array(image))
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
    else:
        raise ResidencyError(f"start image must be a numpy array or torch tensor, got {type(image).__name__}",
                             hint=f"pass an ({height}, {width}, 3) uint8 array")
    if tuple(tensor.shape) != (height, width, 3):
        raise ResidencyError(
            f"start image has shape {tuple(tensor.shape)}, this model takes ({height}, {width}, 3) (H, W, RGB)",
            hint=f"resize or crop it to {width}x{height} (width x height) first; the pipeline does not resize",
        )
    if tensor.dtype != torch.uint8:
        raise ResidencyError(f"start image has dtype {tensor.dtype}, expected uint8",
                             hint="convert with (image * 255).round().astype(np.uint8) if it is in [0, 1]")
    return tensor.permute(2, 0, 1)[None].float().div_(127.5).sub_(1.0)


@dataclass(frozen=True)
class SessionSnapshot:
    """What a step may change, taken before it: the RNG, the frame counter, the last latent, the cache."""

    rng_state: torch.Tensor
    frame_index: int
    last_latent: torch.Tensor  # the tensor itself, not a copy: a step replaces it, never writes into it
    cache: CacheSnapshot


class Session:
    """Created by WorldModelPipeline.start(); not thread-safe (one cache, one generator).

    Implements residency.runtime.session_protocol.RecoverableSession: a runtime that runs out of device
    memory mid-step restores the snapshot taken before it and retries the step.
    """

    def __init__(self, pipe: WorldModelPipeline, image: torch.Tensor, seed: int):
        c = pipe.config
        self.pipe = pipe
        self.config = c
        self.seed = seed
        self.device = pipe.device
        self.dtype = pipe.dtype
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.cache = KVCache(c, batch=1, device=self.device, compute_dtype=self.dtype)
        self._times = [torch.full((1,), t, device=self.device, dtype=self.dtype)
                       for t in timesteps(c.steps, c.timestep_shift)]
        self._zero = torch.zeros(1, device=self.device, dtype=self.dtype)
        self._actions = [torch.full((1,), i, device=self.device, dtype=torch.long) for i in range(len(c.actions))]
        self._latent_shape = (1, c.latent_channels, c.latent_height, c.latent_width)
        with torch.inference_mode():
            self.anchor = pipe.vae.encode_image(image.to(self.device, self.dtype))
            self._commit(self.anchor, self._actions[c.action_index["idle"]])
        self.last_latent = self.anchor
        self.frame_index = 0  # latent frames generated since start/reset

    @property
    def kv_frames(self) -> int:
        """Cached latent frames the next step's attention reads (the anchor and the recent ones, up to the window):
        what a runtime records per frame, so a calibration costs a frame at the window it read."""
        return self.cache.count

    def resolve_action(self, action: str | int) -> int:
        """The index of `action`, given by name or index.

        Raises ResidencyError for an unknown name or an index out of range (bools are refused).
        """
        names = self.config.actions
        if isinstance(action, str) and action in self.config.action_index:
            return self.config.action_index[action]
        if isinstance(action, int | np.integer) and not isinstance(action, bool) and 0 <= action < len(names):
            return int(action)
        raise ResidencyError(f"unknown action {action!r}",
                             hint=f"valid actions: {', '.join(names)} (or their index 0..{len(names) - 1})")

    @torch.inference_mode()
    def step(self, action: str | int) -> np.ndarray:
        """Generate the next latent frame and return its decoded video frames, (T, H, W, 3) uint8."""
        a = self._actions[self.resolve_action(action)]
        dit, cache = self.pipe.dit, self.cache
        noise = torch.randn(self._latent_shape, generator=self.generator, device=self.device).to(self.dtype)
        latent = sample(lambda x, t: dit(x, t, a, cache), noise, self._times)
        self._commit(latent, a)
        frames = self.pipe.vae.decode_uint8(latent)[0]
        self.last_latent = latent
        self.frame_index += 1
        return frames.cpu().numpy()  # the frame's only device sync

    def reset(self) -> None:
        """Back to the start image: generated frames are forgotten, the RNG restarts from the seed."""
        self.cache.truncate_to_anchor()
        self.generator.manual_seed(self.seed)
        self.last_latent = self.anchor
        self.frame_index = 0

    @property
    def kv_cache_bytes(self) -> int:
        """Device bytes of the KV cache (what a runtime accounts for it)."""
        return self.cache.nbytes

    def snapshot(self, protect_kv: bool = True) -> SessionSnapshot:
        """Before a step; its cost is the cache's (KVCache.snapshot) plus the RNG state (a small host tensor)."""
        return SessionSnapshot(self.generator.get_state(), self.frame_index, self.last_latent,
                               self.cache.snapshot(protect_kv))

    def restore(self, snap: SessionSnapshot) -> None:
        """Undo a failed step: the session is exactly as when `snap` was taken."""
        self.cache.restore(snap.cache)
        self.generator.set_state(snap.rng_state)
        self.frame_index = snap.frame_index
        self.last_latent = snap.last_latent

    def window(self) -> list[int]:
        """Latent frame indices held in the KV cache (0 = anchor), oldest first."""
        return self.cache.window()

    def _commit(self, latent: torch.Tensor, action: torch.Tensor) -> None:
        # The cache-write pass: one extra DiT pass at t=0 so past frames are cached clean.
        self.cache.begin_write(self.cache.current_frame)
        self.pipe.dit(latent, self._zero, action, self.cache, output=False)
        self.cache.end_write()
