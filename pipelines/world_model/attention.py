"""Spatial self-attention within a latent frame, and temporal attention across frames.

Both go through F.scaled_dot_product_attention only. Where temporal keys come from (the KV
cache, or a full frame-causal window) is the job of a TemporalContext passed in at call time.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F


class LayerContext(Protocol):
    """What one block's temporal attention reads: past frames' keys and values for that block."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B', heads, tokens, head_dim) of the frame(s) being computed; returns like q."""
        ...


class TemporalContext(Protocol):
    """Where temporal attention gets past frames' keys and values: the KV cache, or a whole clip.

    The model asks it for each block's LayerContext (`layer(i)`) and passes that to the block, so no layer
    index reaches a block's code (a compiled block would otherwise guard on it and compile once per layer).
    """

    def layer(self, layer: int) -> LayerContext:
        """The context of block `layer` (0-based); the same object on every call for a given layer."""
        ...


class _Projections(nn.Module):
    """qkv and output projections with per-head RMS norm on q and k (stable logits at any scale)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, n, -1))


class SpatialAttention(_Projections):
    """Bidirectional attention among the tokens of one latent frame: O(T^2 * dim) per frame."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, tokens, dim) -> (B, tokens, dim): full attention among one frame's tokens."""
        q, k, v = self.qkv_heads(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v))


class TemporalAttention(_Projections):
    """Every token attends to all tokens of the cached past frames and of its own frame.

    Cost: 4·T·(n+1)·T·dim FLOPs per block per pass, n <= context_frames cached frames. For
    lucid-500m (T=220, n=12) that is 2.6 GFLOP, ~35% of the block's weight matmuls; attending
    only to the same spatial position would cost T times less but cannot follow motion across
    positions. The KV bytes are the same either way: every token's K and V are cached.
    """

    def forward(self, x: torch.Tensor, context: LayerContext) -> torch.Tensor:
        """x (B, tokens, dim) -> (B, tokens, dim): attention to past frames through this block's `context`."""
        q, k, v = self.qkv_heads(x)
        return self.merge(context.attend(q, k, v))
