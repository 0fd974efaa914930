"""The VAE: a small conv encoder (RGB frames -> latent frame) and decoder (latent -> RGB frames).

Temporal compression folds T video frames into channels (3T in, 3T out), so one latent
frame is encoded or decoded in a single 2D pass; each block is one unit of residency.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipelines.world_model.config import WorldModelConfig

GROUPS = 8  # GroupNorm groups; widths are validated to be multiples of 8


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a skip (a 1x1 conv when the width changes)."""
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(GROUPS, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, cin, H, W) -> (B, cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Stem(nn.Module):
    """A 3x3 conv into the first width."""
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, cin, H, W) -> (B, cout, H, W)."""
        return self.conv(x)


class Head(nn.Module):
    """GroupNorm, SiLU and a 3x3 conv out of the last width."""
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, cin, eps=1e-6)
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, cin, H, W) -> (B, cout, H, W)."""
        return self.conv(F.silu(self.norm(x)))


class DownBlock(nn.Module):
    """A stride-2 conv to half the resolution, then a widening ResBlock there (mirrors UpBlock).

    Widening only after downsampling keeps full-resolution work to the stem and this conv.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.down = nn.Conv2d(cin, cin, 3, stride=2, padding=1)
        self.res = ResBlock(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, cin, H, W) -> (B, cout, H/2, W/2)."""
        return self.res(self.down(x))


class UpBlock(nn.Module):
    """ResBlock at this resolution, then nearest 2x upsampling and a conv.

    The last one runs its conv at full video resolution: it dominates the decoder's FLOPs.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.res = ResBlock(cin, cout)
        self.up = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, cin, H, W) -> (B, cout, 2H, 2W)."""
        return self.up(F.interpolate(self.res(x), scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """(B, T, 3, H, W) in [-1, 1] -> (B, latent_channels, H/s, W/s): the posterior mean, no sampling."""

    def __init__(self, config: WorldModelConfig):
        super().__init__()
        ch = config.vae_channels
        self.frames = config.temporal_compression
        blocks: list[nn.Module] = [Stem(3 * self.frames, ch[0])]
        blocks += [DownBlock(ch[i], ch[i + 1]) for i in range(config.vae_levels)]
        blocks.append(Head(ch[-1], config.latent_channels))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, T, 3, H, W) in [-1, 1] -> latent (B, latent_channels, H/s, W/s)."""
        x = frames.flatten(1, 2)  # fold time into channels: (B, 3T, H, W)
        for block in self.blocks:
            x = block(x)
        return x


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, T, 3, H, W) in [-1, 1]."""

    def __init__(self, config: WorldModelConfig):
        super().__init__()
        ch = tuple(reversed(config.vae_channels))
        self.frames = config.temporal_compression
        blocks: list[nn.Module] = [Stem(config.latent_channels, ch[0])]
        blocks += [UpBlock(ch[i], ch[i + 1]) for i in range(config.vae_levels)]
        blocks.append(Head(ch[-1], 3 * self.frames))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (B, latent_channels, h, w) -> frames (B, T, 3, H, W) in [-1, 1]."""
        x = latent
        for block in self.blocks:
            x = block(x)
        return torch.tanh(x).unflatten(1, (self.frames, 3))


class VAE(nn.Module):
    """The video autoencoder: an Encoder and a Decoder, T video frames per latent frame."""
    def __init__(self, config: WorldModelConfig):
        super().__init__()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """One (B, 3, H, W) image in [-1, 1] -> one latent frame; the image is repeated T times."""
        return self.encoder(image[:, None].expand(-1, self.encoder.frames, -1, -1, -1))

    def decode_uint8(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent frame -> (B, T, H, W, 3) uint8 video frames."""
        rgb = self.decoder(latent)
        return ((rgb.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2)
