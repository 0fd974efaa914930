"""The world model described as a catalog entry, built by the module builder from its own module tree.

Each component is traced once on the meta device (no memory) by `residency.workload.module_workload`:
the VAE encoder on a start image, the DiT on one latent frame with its KV window full (the steady state:
its ops and elements include reading the window), the VAE decoder on a latent frame. The DiT is traced a
second time with an empty window: the pair FLOPs the full window adds are the blocks' cost per cached
(query, key) pair. The schedule is the pipeline's own (`WorldModelPipeline.schedule`).
`residency.workload.workload_from_dict` turns the document into a Workload.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch

from pipelines.catalog_build.parts import catalog_document, forward_blocks, trace_part, with_cache
from pipelines.world_model.config import WorldModelConfig, get_config
from pipelines.world_model.kv_cache import KVCache
from pipelines.world_model.pipeline import WorldModelPipeline
from residency.workload.spec import BlockSpec, PassSpec, PhaseSpec, Workload

_COMPUTE = torch.bfloat16  # what the meta tensors are: the catalog states bytes at a 2-byte compute dtype


def _dit(c: WorldModelConfig, pipe: WorldModelPipeline, cached_frames: int) -> Workload:
    """One DiT call on a latent frame with `cached_frames` frames in every block's KV window."""
    cache = KVCache(c, device="meta", compute_dtype=_COMPUTE)
    cache.count = cached_frames
    example = (torch.empty(1, c.latent_channels, c.latent_height, c.latent_width, device="meta"),
               torch.zeros(1, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"), cache)
    # siblings stay apart: the runtime and the schedule know cond_embed and patch_embed as two blocks
    return trace_part("dit", pipe.dit, example, "dit", group_siblings=False)


def _dit_blocks(c: WorldModelConfig, pipe: WorldModelPipeline) -> list[BlockSpec]:
    """The DiT's blocks at a full window, the cached-pair FLOPs split from the own-frame ones."""
    full, empty = _dit(c, pipe, c.context_frames), _dit(c, pipe, 0)
    alone = empty.by_name
    out = []
    for b in full.blocks:
        own = alone[b.name].self_attn_flops_per_token_pair
        if b.self_attn_flops_per_token_pair == own:  # attends to no cached frame
            out.append(b)
            continue
        t = b.tokens
        # the pair FLOPs the window adds, per (query, cached key): t queries × context_frames·t keys
        cached = (b.self_attn_flops_per_token_pair - own) * t * t / (t * c.context_frames * t)
        out.append(with_cache(b, cached, 2 * c.heads * c.head_dim, self_pair_flops=own))
    return out


def _phases(pipe: WorldModelPipeline) -> tuple[PhaseSpec, ...]:
    phases: dict[str, tuple[str, list[PassSpec]]] = {}
    for e in pipe.schedule():
        _, listed = phases.setdefault(e.phase, (e.per, []))
        # The Euler pass is the one that only reads the cache; it runs once per denoise step.
        listed.append(PassSpec(e.blocks, per_step=e.kv == "read", kv=e.kv, purpose=e.purpose))
    return tuple(PhaseSpec(name, per, tuple(listed)) for name, (per, listed) in phases.items())


def catalog_entry(name_or_config: str | WorldModelConfig) -> dict[str, Any]:
    """The catalog document of a world-model config (JSON-ready), a fresh copy the caller may change. Cost: four
    meta forwards (~1 s) the first time per config in a process; later calls copy the cached document."""
    return copy.deepcopy(_traced_entry(get_config(name_or_config)))


@functools.lru_cache(maxsize=8)
def _traced_entry(c: WorldModelConfig) -> dict[str, Any]:
    pipe = WorldModelPipeline.from_config(c, device="meta")
    frames = torch.empty(1, c.temporal_compression, 3, c.height, c.width, device="meta")
    latent = torch.empty(1, c.latent_channels, c.latent_height, c.latent_width, device="meta")
    encoder = trace_part("vae.encoder", pipe.vae.encoder, frames, "encoder", group_siblings=False)
    decoder = trace_part("vae.decoder", pipe.vae.decoder, latent, "decoder", group_siblings=False)
    blocks = [*encoder.blocks, *_dit_blocks(c, pipe), *decoder.blocks]
    names = [n for n, _, _ in pipe.blocks()]
    traced = [*forward_blocks(encoder), *(b.name for b in blocks if b.component == "dit"), *forward_blocks(decoder)]
    if names != [b.name for b in blocks] or names != traced:
        raise AssertionError(f"{c.name}: traced blocks {traced} are not pipe.blocks() {names}")
    workload = Workload(
        name=c.name, blocks=tuple(blocks), phases=_phases(pipe), steps=c.steps, context_frames=c.context_frames,
        batch=1, kv_dtype=c.kv_dtype, video_frames_per_latent=c.temporal_compression,
        source=f"pipelines.world_model preset {c.name!r} on the meta device, traced by "
               "residency.workload.module_workload")
    return catalog_document(workload, {"config": c.to_dict(), "tokens_per_frame": c.tokens_per_frame,
                                       "video": f"{c.width}x{c.height}"})
