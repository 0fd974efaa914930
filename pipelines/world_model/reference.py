"""Non-cached reference: frame-causal attention over a whole window, recomputed from scratch.

The oracle for the KV cache. It matches cached generation while nothing was evicted; after an
eviction the cached K/V of a frame still carry the evicted frames they saw when written.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from pipelines.world_model.config import WorldModelConfig
from pipelines.world_model.dit import CausalDiT
from pipelines.world_model.sampler import sample, timesteps
from pipelines.world_model.session import image_to_tensor
from pipelines.world_model.temporal_rope import relative_position, rope_tables, rotate


class ReferenceContext:
    """TemporalContext over N frames batched as (B*N, ...): frame i attends to frames 0..i."""

    def __init__(self, config: WorldModelConfig, frame_indices: list[int]):
        self.config = config
        self.frame_indices = frame_indices

    def layer(self, layer: int) -> ReferenceContext:
        """Every block reads the same frames: the context itself."""
        return self

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of each frame to itself and the frames before it, recomputed without a cache.

        q, k, v: (B*N, heads, tokens, head_dim) for the N frames; returns like q. The oracle the KV cache is checked against.
        """
        n = len(self.frame_indices)
        q, k, v = (x.unflatten(0, (-1, n)) for x in (q, k, v))  # (B, N, heads, T, head_dim)
        outs = []
        for i, current in enumerate(self.frame_indices):
            positions = torch.tensor(
                [relative_position(current, past, self.config.context_frames) for past in self.frame_indices[: i + 1]]
            )
            cos, sin = rope_tables(positions.to(q.device), self.config.head_dim, self.config.rope_theta, q.dtype)
            keys = rotate(k[:, : i + 1].transpose(1, 2), cos, sin).flatten(2, 3)  # (B, heads, (i+1)T, hd)
            values = v[:, : i + 1].transpose(1, 2).flatten(2, 3)
            outs.append(F.scaled_dot_product_attention(q[:, i], keys, values))
        return torch.stack(outs, dim=1).flatten(0, 1)


def reference_forward(
    dit: CausalDiT,
    frames: torch.Tensor,
    times: torch.Tensor,
    actions: torch.Tensor,
    frame_indices: list[int],
) -> torch.Tensor:
    """frames (B, N, C, h, w), per-frame times (B, N) and actions (B, N) -> velocities (B, N, C, h, w)."""
    context = ReferenceContext(dit.config, frame_indices)
    out = dit(frames.flatten(0, 1), times.flatten(), actions.flatten(), context)
    return out.unflatten(0, frames.shape[:2])


@torch.inference_mode()
def reference_rollout(pipe, image: np.ndarray | torch.Tensor, actions: list[int], seed: int) -> list[torch.Tensor]:
    """Generate len(actions) latent frames as a Session would, recomputing the window each step.

    Same noise draws, timesteps and window rule (anchor + the last context_frames-1 frames).
    """
    c = pipe.config
    device, dtype = pipe.device, pipe.dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    times = [torch.full((1,), t, device=device, dtype=dtype) for t in timesteps(c.steps, c.timestep_shift)]
    anchor = pipe.vae.encode_image(image_to_tensor(image, c.height, c.width).to(device, dtype))
    latents, acts = [anchor], [c.action_index["idle"]]
    for action in actions:
        current = len(latents)
        window = [0] + list(range(max(1, current - c.context_frames + 1), current))
        past = torch.stack([latents[i] for i in window], dim=1)  # (1, n, C, h, w)
        idx = window + [current]
        act = torch.tensor([[acts[i] for i in window] + [action]], device=device)

        def velocity(x: torch.Tensor, t: torch.Tensor, past=past, idx=idx, act=act) -> torch.Tensor:
            frames = torch.cat((past, x[:, None]), dim=1)
            ts = torch.cat((torch.zeros(1, past.shape[1], device=device, dtype=dtype), t[:, None]), dim=1)
            return reference_forward(pipe.dit, frames, ts, act, idx)[:, -1]

        noise = torch.randn((1, c.latent_channels, c.latent_height, c.latent_width),
                            generator=generator, device=device).to(dtype)
        latents.append(sample(velocity, noise, times))
        acts.append(action)
    return latents[1:]
