"""Training losses of the world model: the VAE's reconstruction, and diffusion forcing on the DiT.

Both run the pipeline's own modules. The DiT sees a whole clip in one pass through ClipContext,
the batched form of reference.py's non-cached context (frame i attends to frames 0..i), with an independent flow-matching
time per frame — the convention of sampler.py: x_t = (1-t)·x0 + t·noise, target v = noise - x0.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipelines.world_model.config import WorldModelConfig
from pipelines.world_model.dit import CausalDiT
from pipelines.world_model.temporal_rope import relative_position, rope_tables, rotate
from pipelines.world_model.vae import VAE

CONTEXT_MAX_T = 0.1  # a context frame is clean or lightly noised: robustness to the model's own errors


class ClipContext:
    """ReferenceContext's arithmetic in one masked attention call per block (no per-frame loop).

    Every key frame is rotated by its distance to every query frame: (N, N) rotations of T
    tokens, N times the K bytes of one pass — small at training clip lengths, and 2-3x faster
    than a Python loop of N attention calls with its backward.
    """

    def __init__(self, config: WorldModelConfig, frame_indices: list[int], device: torch.device | str = "cpu"):
        n, t = len(frame_indices), config.tokens_per_frame
        self.n = n
        dist = [[relative_position(i, j, config.context_frames) if j <= i else 0 for j in frame_indices]
                for i in frame_indices]
        cos, sin = rope_tables(torch.tensor(dist).flatten(), config.head_dim, config.rope_theta, torch.float32)
        self.cos = cos.reshape(n, 1, n, 1, -1).to(device)  # (Nq, heads=1, Nk, tokens=1, head_dim/2)
        self.sin = sin.reshape(n, 1, n, 1, -1).to(device)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        self.mask = causal.repeat_interleave(t, 1).reshape(n, 1, 1, n * t).to(device)  # (Nq, 1, 1, Nk*T)

    def layer(self, layer: int) -> ClipContext:
        """Every block reads the same clip: the context itself."""
        return self

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over a whole training clip: each frame to itself and the frames before it.

        q, k, v: (B*N, heads, tokens, head_dim); returns like q.
        """
        n = self.n
        q, k, v = (x.unflatten(0, (-1, n)) for x in (q, k, v))  # (B, N, heads, T, head_dim)
        cos, sin = self.cos.to(q.dtype), self.sin.to(q.dtype)
        keys = rotate(k.transpose(1, 2)[:, None], cos, sin)  # (B, Nq, heads, Nk, T, head_dim)
        keys = keys.flatten(3, 4)
        values = v.transpose(1, 2).flatten(2, 3)[:, None].expand(-1, n, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask)
        return out.flatten(0, 1)


def clip_forward(
    dit: CausalDiT, frames: torch.Tensor, times: torch.Tensor, actions: torch.Tensor, frame_indices: list[int]
) -> torch.Tensor:
    """reference_forward through ClipContext: (B, N, C, h, w), (B, N), (B, N) -> velocities (B, N, C, h, w)."""
    context = ClipContext(dit.config, frame_indices, frames.device)
    out = dit(frames.flatten(0, 1), times.flatten(), actions.flatten(), context)
    return out.unflatten(0, frames.shape[:2])


def _weighted_mean(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return x.mean()
    weight = weight.expand_as(x)
    return (x * weight).sum() / weight.sum()


def vae_loss(
    vae: VAE,
    frames: torch.Tensor,
    generator: torch.Generator,
    latent_noise: float = 0.1,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """frames (B, T, 3, H, W) in [-1, 1] -> loss, parts. `weight` (broadcastable, per pixel) emphasises
    small objects that a plain mean would let the decoder blur away.

    The decoder reads latents with N(0, latent_noise²) added, so the DiT's small errors decode
    gracefully; the encoder's mean square is pinned to 1 so latents match the sampler's unit noise
    (there is no latent scale factor in the pipeline).
    """
    z = vae.encoder(frames)
    noise = torch.randn(z.shape, generator=generator, dtype=z.dtype)
    recon = vae.decoder(z + latent_noise * noise)
    recon = recon.float()
    mse = F.mse_loss(recon, frames)
    l1 = F.l1_loss(recon, frames)
    scale = (z.float().pow(2).mean() - 1.0).pow(2)
    diff = recon - frames
    loss = _weighted_mean(diff.pow(2), weight) + 0.5 * _weighted_mean(diff.abs(), weight) + 0.1 * scale
    return loss, {"mse": mse.item(), "l1": l1.item(), "latent_rms": z.float().pow(2).mean().sqrt().item()}


def frame_times(
    batch: int, frames: int, generator: torch.Generator, context_p: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent flow-matching times per frame (diffusion forcing) and the loss mask.

    Frame 0 (the anchor) is always a context frame. Each other frame is, with probability
    `context_p`, a context frame (t = 0 half the time, else U(0, CONTEXT_MAX_T); no loss: its
    velocity target is mostly unpredictable noise) or else a target frame with t ~ U(0, 1).
    Inference reads clean past frames; the mix teaches both that and noisy contexts.
    """
    u = torch.rand(batch, frames, generator=generator)
    is_context = torch.rand(batch, frames, generator=generator) < context_p
    is_context[:, 0] = True
    clean = torch.rand(batch, frames, generator=generator) < 0.5
    t_context = torch.where(clean, torch.zeros_like(u), u * CONTEXT_MAX_T)
    return torch.where(is_context, t_context, u), ~is_context


def diffusion_forcing_loss(
    dit: CausalDiT,
    latents: torch.Tensor,
    actions: torch.Tensor,
    frame_indices: list[int],
    generator: torch.Generator,
    context_p: float = 0.5,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """latents (B, N, C, h, w) clean, actions (B, N) long; frame 0 is the anchor (action idle).

    `weight` (B, N, h, w), optional: per latent pixel, e.g. larger where a small moving object is.

    frame_indices are the frames' positions in the episode (e.g. [0, 17, 18, …]): they set the
    temporal RoPE distances exactly as the KV cache's window does at inference.
    """
    b, n = latents.shape[:2]
    t, target_mask = frame_times(b, n, generator, context_p)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    tt = t.to(latents.dtype)[..., None, None, None]
    x_t = (1.0 - tt) * latents + tt * noise
    v = clip_forward(dit, x_t, t.to(latents.dtype), actions, frame_indices)
    err = (v - (noise - latents)).pow(2).mean(dim=2)  # (B, N, h, w)
    if weight is None:
        per_frame = err.mean(dim=(2, 3))
    else:
        per_frame = (err * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
    weight = target_mask.to(per_frame.dtype)
    return (per_frame * weight).sum() / weight.sum().clamp(min=1.0)


@torch.no_grad()
def adaln_zero_(dit: CausalDiT) -> None:
    """adaLN-Zero init (DiT): every residual gate and the output projection start at 0.

    Blocks start as the identity, which trains much faster than the pipeline's generic init.
    """
    for module in [block.ada for block in dit.blocks] + [dit.final.ada, dit.final.proj]:
        module.weight.zero_()
        module.bias.zero_()


class EMA:
    """Exponential moving average of a module's parameters (what ships), warmed up over ~1/(1-decay) steps."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Move the shadow weights toward `module`'s; the decay ramps up with `step` (warm-up)."""
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1.0 - d)
            else:
                self.shadow[k].copy_(v)
