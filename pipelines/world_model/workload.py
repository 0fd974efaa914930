"""The world model described as a catalog entry: blocks with tensors, FLOP coefficients, KV and activations.

Built on the meta device (no memory); `residency.workload.workload_from_dict` turns it into a Workload.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipelines.world_model.config import WorldModelConfig, get_config
from pipelines.world_model.kv_cache import KVCache
from pipelines.world_model.pipeline import WorldModelPipeline
from residency.workload.op_count import OpCounter

CATALOG_SCHEMA_VERSION = 1
_ACT_BYTES = 2  # activation coefficients are stated at a 2-byte compute dtype


def _tensors(module: nn.Module) -> list[list[Any]]:
    """What a checkpoint stores of the block: parameters and persistent buffers, torch shapes."""
    return [[n, list(t.shape)] for n, t in module.state_dict(keep_vars=True).items() if t.is_floating_point()]


def _count_ops(run) -> tuple[dict[str, int], object]:
    with OpCounter() as counter:
        out = run()
    return counter.counts(), out


def _conv_block_entry(name: str, component: str, module: nn.Module, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """VAE blocks: FLOPs counted on the meta device; 'tokens' are the block's output pixels."""
    with FlopCounterMode(display=False) as counter, OpCounter() as op_counter:  # one meta run, both counts
        y = module(x)
    ops = op_counter.counts()
    pixels = y.shape[-2] * y.shape[-1]
    widest = max(x.shape[1] * x.shape[-2] * x.shape[-1], y.shape[1] * pixels)
    entry = {
        "name": name, "component": component, "tensors": _tensors(module), "tokens": pixels,
        "flops_per_token": counter.get_total_flops() / pixels,
        # input + output + one intermediate of the widest size live at once
        "activation_bytes_per_token": 3 * widest * _ACT_BYTES / pixels,
        **ops,
    }
    return entry, y


def _dit_ops(c: WorldModelConfig, pipe: WorldModelPipeline) -> dict[str, dict[str, int]]:
    """Ops per call of each DiT module, the blocks with a full KV window (the steady state)."""
    cache = KVCache(c, device="meta")
    cache.count = c.context_frames
    t = torch.zeros(1, device="meta")
    action = torch.zeros(1, dtype=torch.long, device="meta")
    latent = torch.empty(1, c.latent_channels, c.latent_height, c.latent_width, device="meta")
    out = {}
    out["dit.cond_embed"], cond = _count_ops(lambda: pipe.dit.cond_embed(t, action))
    out["dit.patch_embed"], x = _count_ops(lambda: pipe.dit.patch_embed(latent))
    out["dit.blocks"], x = _count_ops(lambda: pipe.dit.blocks[0](x, cond, cache.layer(0)))
    out["dit.final"], _ = _count_ops(lambda: pipe.dit.final(x, cond))
    return out


def _dit_entries(c: WorldModelConfig, pipe: WorldModelPipeline) -> list[dict]:
    d, h, t = c.dim, c.mlp_hidden, c.tokens_per_frame
    ops = _dit_ops(c, pipe)
    out = [
        {"name": "dit.cond_embed", "component": "dit", "tensors": _tensors(pipe.dit.cond_embed), "tokens": 1,
         "flops_per_token": 2.0 * (c.timestep_freq_dim * d + d * d), "activation_bytes_per_token": 4 * d * _ACT_BYTES,
         **ops["dit.cond_embed"]},
        {"name": "dit.patch_embed", "component": "dit", "tensors": _tensors(pipe.dit.patch_embed), "tokens": t,
         "flops_per_token": 2.0 * c.patch_dim * d, "activation_bytes_per_token": (c.patch_dim + 2 * d) * _ACT_BYTES,
         **ops["dit.patch_embed"]},
    ]
    for i, block in enumerate(pipe.dit.blocks):
        out.append({
            "name": f"dit.blocks.{i}", "component": "dit", "tensors": _tensors(block), "tokens": t,
            # spatial qkv+proj, temporal qkv+proj, MLP; adaLN runs once per call on the conditioning
            "flops_per_token": 2.0 * (4 * d * d + 4 * d * d + 2 * d * h),
            "fixed_flops": 2.0 * d * 6 * d,
            # spatial attention over the frame, plus the temporal attention's own-frame part
            "self_attn_flops_per_token_pair": 2 * 4.0 * d,
            "context_attn_flops_per_token_pair": 4.0 * d,
            "context_tokens_per_frame": t,
            "kv_channels_per_token": 2 * d,
            # x, the residual, qkv (3d) and the MLP hidden live together at the peak
            "activation_bytes_per_token": (2 * d + 3 * d + h) * _ACT_BYTES,
            **ops["dit.blocks"],
        })
    out.append({"name": "dit.final", "component": "dit", "tensors": _tensors(pipe.dit.final), "tokens": t,
                "flops_per_token": 2.0 * d * c.patch_dim, "fixed_flops": 2.0 * d * 2 * d,
                "activation_bytes_per_token": (2 * d + c.patch_dim) * _ACT_BYTES, **ops["dit.final"]})
    return out


# no_grad: autograd would add alias/detach ops to every count. Not inference_mode, although sessions run under
# it: there composite ops (linear, attention) reach the counter whole — tiny's DiT block dispatches 63 aten
# ops that way against 138 here — and the per-op cost the profile measures then has no term for the blocks'
# Python (19 module calls and their forward bodies), which the larger count stands in for.
@torch.no_grad()
def catalog_entry(name_or_config: str | WorldModelConfig) -> dict[str, Any]:
    """The catalog document of a world-model config (JSON-ready)."""
    c = get_config(name_or_config)
    pipe = WorldModelPipeline.from_config(c, device="meta")
    blocks: list[dict] = []
    x = torch.empty(1, 3 * c.temporal_compression, c.height, c.width, device="meta")
    for i, block in enumerate(pipe.vae.encoder.blocks):
        entry, x = _conv_block_entry(f"vae.encoder.blocks.{i}", "encoder", block, x)
        blocks.append(entry)
    blocks += _dit_entries(c, pipe)
    x = torch.empty(1, c.latent_channels, c.latent_height, c.latent_width, device="meta")
    for i, block in enumerate(pipe.vae.decoder.blocks):
        entry, x = _conv_block_entry(f"vae.decoder.blocks.{i}", "decoder", block, x)
        blocks.append(entry)
    names = [n for n, _, _ in pipe.blocks()]
    assert names == [b["name"] for b in blocks], "catalog blocks must follow pipe.blocks()"

    phases: dict[str, dict] = {}
    for e in pipe.schedule():
        phase = phases.setdefault(e.phase, {"name": e.phase, "per": e.per, "passes": []})
        # The Euler pass is the one that only reads the cache; it runs once per denoise step.
        phase["passes"].append({"blocks": list(e.blocks), "per_step": e.kv == "read",
                                "kv": e.kv, "purpose": e.purpose})
    return {
        "schema_version": CATALOG_SCHEMA_VERSION,
        "name": c.name,
        "source": f"pipelines.world_model preset {c.name!r}, instantiated on the meta device",
        "steps": c.steps,
        "context_frames": c.context_frames,
        "batch": 1,
        "kv_dtype": c.kv_dtype,
        "video_frames_per_latent": c.temporal_compression,
        "blocks": blocks,
        "phases": list(phases.values()),
        "extra": {"config": c.to_dict(), "tokens_per_frame": c.tokens_per_frame,
                  "video": f"{c.width}x{c.height}"},
    }
