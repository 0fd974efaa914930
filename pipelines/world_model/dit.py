"""The causal DiT: one latent frame in, its flow-matching velocity out, the past read through a context.

Each block: spatial attention (adaLN-modulated), temporal attention to past frames, MLP
(adaLN-modulated). adaLN is conditioned on the denoise timestep plus the action embedding.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pipelines.world_model.attention import LayerContext, SpatialAttention, TemporalAttention, TemporalContext
from pipelines.world_model.config import WorldModelConfig


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1.0 + scale)


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled to [0, 1000] as in DiT): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat((args.cos(), args.sin()), dim=-1)


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (MAE/DiT), (grid_h*grid_w, dim); half the channels per axis."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                            torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    out = [f(axis.reshape(-1)[:, None] * omega[None]) for axis in (ys, xs) for f in (torch.sin, torch.cos)]
    emb = torch.cat(out, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])).float()


class ConditionEmbed(nn.Module):
    """(timestep, action) -> SiLU(MLP(t) + E[action]): the input of every adaLN projection."""

    def __init__(self, config: WorldModelConfig):
        super().__init__()
        self.freq_dim = config.timestep_freq_dim
        self.time_in = nn.Linear(config.timestep_freq_dim, config.dim)
        self.time_out = nn.Linear(config.dim, config.dim)
        self.action = nn.Embedding(len(config.actions), config.dim)

    def forward(self, t: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """t (B,) in [0, 1] and action (B,) long -> conditioning (B, dim)."""
        features = timestep_features(t, self.freq_dim).to(self.time_in.weight.dtype)
        return F.silu(self.time_out(F.silu(self.time_in(features))) + self.action(action))


class PatchEmbed(nn.Module):
    """(B, C, h, w) latent -> (B, T, dim) tokens, plus a fixed 2D position embedding (not a parameter)."""

    def __init__(self, config: WorldModelConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.patch_dim, config.dim)
        self.register_buffer("pos", torch.empty(config.tokens_per_frame, config.dim), persistent=False)
        self.init_buffers()

    def init_buffers(self) -> None:
        """Build the 2-D sin-cos position table on the projection's device and dtype."""
        c = self.config
        self.pos = sincos_2d(c.grid_height, c.grid_width, c.dim).to(self.proj.weight.device, self.proj.weight.dtype)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (B, C, h, w) -> tokens (B, tokens, dim) with positions added."""
        return self.proj(patchify(latent, self.config.patch_size)) + self.pos


def patchify(latent: torch.Tensor, p: int) -> torch.Tensor:
    """latent (B, C, h, w) -> (B, (h/p)(w/p), C*p*p): one token per p x p patch, row-major."""
    b, c, h, w = latent.shape
    x = latent.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, config: WorldModelConfig) -> torch.Tensor:
    """tokens (B, tokens, C*p*p) -> latent (B, C, h, w); the inverse of patchify."""
    p, c = config.patch_size, config.latent_channels
    x = tokens.reshape(tokens.shape[0], config.grid_height, config.grid_width, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(tokens.shape[0], c, config.latent_height, config.latent_width)


class MLP(nn.Module):
    """Two linear layers with tanh-GELU between: dim -> hidden -> dim."""
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TemporalMixer(nn.Module):
    """The temporal-mixing module of a block: pre-norm, attention to the past, learned gate."""

    def __init__(self, config: WorldModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.dim, eps=1e-6)
        self.attn = TemporalAttention(config.dim, config.heads)
        self.gate = nn.Parameter(torch.ones(config.dim))

    def forward(self, x: torch.Tensor, context: LayerContext) -> torch.Tensor:
        """x (B, tokens, dim) -> the gated temporal-attention update (B, tokens, dim)."""
        return self.gate * self.attn(self.norm(x), context)


class DiTBlock(nn.Module):
    """x (B, T, dim), c (B, dim) conditioning, its layer's context -> x. One unit of residency.

    Capture-safe (torch.compile fullgraph, CUDA graphs): no layer index or other per-layer Python value, no
    host sync, no data-dependent branch; what its context reads may vary only in a fixed set of shapes
    (KVCache: the window's fill while it fills, one shape once full).
    """

    def __init__(self, config: WorldModelConfig):
        super().__init__()
        dim = config.dim
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SpatialAttention(dim, config.heads)
        self.temporal = TemporalMixer(config)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, config.mlp_hidden)
        self.ada = nn.Linear(dim, 6 * dim)  # shift, scale, gate for attention and for the MLP

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: LayerContext) -> torch.Tensor:
        """x (B, tokens, dim), conditioning c (B, dim), this block's context -> x after spatial, temporal
        and MLP updates."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(_modulate(self.norm1(x), shift1, scale1))
        x = x + self.temporal(x, context)
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and projection from tokens back to a latent frame."""
    def __init__(self, config: WorldModelConfig):
        super().__init__()
        self.config = config
        self.norm = nn.LayerNorm(config.dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(config.dim, 2 * config.dim)
        self.proj = nn.Linear(config.dim, config.patch_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, tokens, dim), c (B, dim) -> velocity (B, C, h, w)."""
        shift, scale = self.ada(c)[:, None].chunk(2, dim=-1)
        return unpatchify(self.proj(_modulate(self.norm(x), shift, scale)), self.config)


class CausalDiT(nn.Module):
    """The causal diffusion transformer: conditioning, patch embedding, DiT blocks, final layer."""
    def __init__(self, config: WorldModelConfig):
        super().__init__()
        self.config = config
        self.cond_embed = ConditionEmbed(config)
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final = FinalLayer(config)

    def forward(
        self,
        latent: torch.Tensor,
        t: torch.Tensor,
        action: torch.Tensor,
        context: TemporalContext,
        *,
        output: bool = True,
    ) -> torch.Tensor | None:
        """latent (B, C, h, w), t (B,) in [0, 1], action (B,) long -> velocity (B, C, h, w).

        output=False skips the final layer (a cache-write pass only needs the blocks' K/V).
        """
        c = self.cond_embed(t, action)
        x = self.patch_embed(latent)
        for i, block in enumerate(self.blocks):
            x = block(x, c, context.layer(i))
        return self.final(x, c) if output else None

    def block_names(self, output: bool = True) -> list[str]:
        """Qualified names (under `dit.`) of the modules forward() calls, in order."""
        names = ["cond_embed", "patch_embed"] + [f"blocks.{i}" for i in range(len(self.blocks))]
        return names + ["final"] if output else names
