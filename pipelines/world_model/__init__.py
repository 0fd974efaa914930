"""A causal diffusion world model: diffusion forcing on a DiT, one latent frame per keyboard action.

Generation: each new latent frame is denoised in `steps` flow-matching Euler steps (default
4) while past frames are read from the per-block KV cache; the clean frame is then written
into the cache by one extra DiT pass at t=0 (the "cache-write pass", final layer skipped), so
the cache holds K/V of clean frames as in training — at a cost of (steps+1)/steps DiT passes.

The KV cache keeps the anchor (the start image's latent) plus a ring of the most recent
frames; temporal RoPE positions are relative to the frame being generated (kv_cache.py).
Plain PyTorch: `residency` attaches from outside with hooks on `pipe.blocks()`.
"""

from pipelines.world_model.config import ACTIONS, KV_DTYPES, PRESETS, WorldModelConfig, get_config
from pipelines.world_model.kv_cache import KVCache
from pipelines.world_model.pipeline import WorldModelPipeline
from pipelines.world_model.schedule import PHASES, ScheduleEntry
from pipelines.world_model.session import Session

__all__ = [
    "ACTIONS",
    "KV_DTYPES",
    "PHASES",
    "PRESETS",
    "KVCache",
    "ScheduleEntry",
    "Session",
    "WorldModelConfig",
    "WorldModelPipeline",
    "get_config",
]
