"""The wan-causal-1.3b catalog entry: a Wan2.1-T2V-1.3B causal world model (Self-Forcing / Matrix-Game 2 family).

umT5-XXL, the 30-block DiT with a rolling KV window, and the Wan VAE at 480×832, built on the meta device.
"""

from __future__ import annotations

from typing import Any

import torch

from tools.catalog_common import (
    ACT_BYTES,
    CATALOG_SCHEMA_VERSION,
    block_flops,
    check_flops,
    check_sdpa_context_flops,
    conv_entries,
    count_flops,
    module_flops,
    params_by_component,
    t5_encoder_entries,
    tensors,
    transformer_pass,
)

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json.
TRANSFORMER_CONFIG = {"patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128,
                      "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960,
                      "num_layers": 30, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
                      "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024}
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers text_encoder/config.json (google/umt5-xxl, encoder only).
UMT5_CONFIG = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
               "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
               "relative_attention_max_distance": 128}
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers vae/config.json (the Wan 2.1 causal 3D VAE: 8×8 spatial, 4× temporal).
VAE_CONFIG = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
              "temperal_downsample": [False, True, True], "dropout": 0.0}

HEIGHT, WIDTH = 480, 832  # pixels of a video frame
VAE_SCALE = 8  # spatial compression
TEMPORAL = 4  # video frames per latent frame after the first
TEXT_TOKENS = 512  # Wan's max_sequence_length for umT5
STEPS = 4  # Self-Forcing's 4-step denoising schedule
# Cached latent frames each block attends to besides the current one: Matrix-Game 2's local attention
# window of 6 latent frames (Self-Forcing's sink + rolling window sits in the same range).
CONTEXT_FRAMES = 6


def _transformer_embed_entry(model, d: int, t: int, patch_dim: int) -> dict:
    """The patch embedding per token; the timestep and text embedders once per call."""
    c = model.config
    return {
        "name": "transformer.embed", "component": "transformer", "tokens": t,
        "tensors": tensors([("patch_embedding", model.patch_embedding), ("condition_embedder", model.condition_embedder)]),
        "flops_per_token": 2.0 * patch_dim * d,
        # timestep MLP (freq → d → d), its 6-way modulation d → 6d, and the text MLP (4096 → d → d) per text token
        "fixed_flops": 2.0 * (c.freq_dim * d + d * d + 6 * d * d + TEXT_TOKENS * (c.text_dim * d + d * d)),
        "activation_bytes_per_token": (patch_dim + d) * ACT_BYTES,
    }


def _block_entry(i: int, block, d: int, t: int, ffn_dim: int) -> dict:
    return {
        "name": f"transformer.blocks.{i}", "component": "transformer",
        "tensors": tensors([("", block)]), "tokens": t,
        "flops_per_token": 2.0 * (4 * d * d + 2 * d * d + 2 * d * ffn_dim) + 4.0 * d * TEXT_TOKENS,
        "fixed_flops": 2.0 * 2 * d * d * TEXT_TOKENS,
        "self_attn_flops_per_token_pair": 4.0 * d,
        "context_attn_flops_per_token_pair": 4.0 * d,
        "context_tokens_per_frame": t,
        "kv_channels_per_token": 2 * d,
        # x, residual, q/k/v and the FFN hidden; SDPA keeps no (tokens × tokens) score matrix
        "activation_bytes_per_token": (2 * d + 3 * d + ffn_dim) * ACT_BYTES,
    }


def _transformer_final_entry(model, d: int, t: int, patch_dim: int) -> dict:
    return {
        "name": "transformer.final", "component": "transformer", "tokens": t,
        "tensors": tensors([("scale_shift_table", model.scale_shift_table), ("norm_out", model.norm_out),
                            ("proj_out", model.proj_out)]),
        "flops_per_token": 2.0 * d * patch_dim,
        "activation_bytes_per_token": (2 * d + patch_dim) * ACT_BYTES,
    }


def _check_transformer_flops(model, entries: list[dict], d: int, t: int) -> None:
    """Counts one cache-less call on the meta device and checks the entries' FLOPs against it, then the cached
    attention on its own; raises (check_flops) on a mismatch."""
    c = model.config
    lat_h, lat_w = HEIGHT // VAE_SCALE, WIDTH // VAE_SCALE

    def run():
        return model(hidden_states=torch.empty(1, c.in_channels, 1, lat_h, lat_w, device="meta"),
                     timestep=torch.zeros(1, device="meta"),
                     encoder_hidden_states=torch.empty(1, TEXT_TOKENS, c.text_dim, device="meta"),
                     return_dict=False)

    total, per_module, _ = count_flops(run)
    root = type(model).__name__
    by_name = {e["name"]: e for e in entries}
    # diffusers' block has no KV cache: the counted call is the cache-less one (context_frames = 0) ...
    check_flops("transformer block", block_flops(by_name["transformer.blocks.0"]),
                module_flops(per_module, root, "blocks.0"))
    check_flops("transformer embeddings", block_flops(by_name["transformer.embed"]),
                sum(module_flops(per_module, root, p) for p in ("patch_embedding", "condition_embedder")))
    check_flops("transformer whole call", sum(block_flops(e) for e in entries), total)
    # ... and the cached part is checked on attention alone: t queries over t + CONTEXT_FRAMES·t keys.
    check_sdpa_context_flops(d, c.num_attention_heads, t, CONTEXT_FRAMES * t)


def _transformer_entries(model) -> list[dict]:
    """The causal DiT, one latent frame (t tokens) per call, keys/values of past frames read from the cache.

    Block, per token: self-attention q, k, v, o (4·d²), cross-attention q, o (2·d²) and the GELU FFN
    (2·d·ffn), ×2 FLOPs, plus cross-attention over the fixed 512 text tokens (4·d·512). Per call: the
    cross-attention k, v of the text (2·2·d²·512; diffusers recomputes them, a cross-attn cache would not).
    Self-attention: 4·d per (query, key) pair, over the frame itself and over the cached frames.
    """
    c = model.config
    d = c.num_attention_heads * c.attention_head_dim
    pt, ph, pw = c.patch_size
    t = (HEIGHT // VAE_SCALE // ph) * (WIDTH // VAE_SCALE // pw)
    patch_dim = c.in_channels * pt * ph * pw
    entries = [_transformer_embed_entry(model, d, t, patch_dim)]
    entries += [_block_entry(i, block, d, t, c.ffn_dim) for i, block in enumerate(model.blocks)]
    entries.append(_transformer_final_entry(model, d, t, patch_dim))
    _check_transformer_flops(model, entries, d, t)
    return entries


def _vae_encoder_entries(vae) -> list[dict]:
    """The start image (one frame, the causal VAE's first chunk) -> the first latent frame."""
    enc = vae.encoder
    groups = [("conv_in", ["encoder.conv_in"])]
    groups += [(f"down_blocks.{i}", [f"encoder.down_blocks.{i}"]) for i in range(len(enc.down_blocks))]
    groups += [("mid_block", ["encoder.mid_block"]), ("out", ["encoder.norm_out", "encoder.conv_out", "quant_conv"])]
    image = torch.empty(1, 3, 1, HEIGHT, WIDTH, device="meta")
    vae.clear_cache()
    return conv_entries("vae_encoder", vae, groups,
                        lambda: vae.quant_conv(enc(image, feat_cache=vae._enc_feat_map, feat_idx=[0])))


def _vae_decoder_entries(vae) -> list[dict]:
    """Steady state: a latent frame after the first decodes to TEMPORAL video frames (its causal cache primed)."""
    dec = vae.decoder
    groups = [("conv_in", ["post_quant_conv", "decoder.conv_in"]), ("mid_block", ["decoder.mid_block"])]
    groups += [(f"up_blocks.{i}", [f"decoder.up_blocks.{i}"]) for i in range(len(dec.up_blocks))]
    groups.append(("out", ["decoder.norm_out", "decoder.conv_out"]))
    z = torch.empty(1, VAE_CONFIG["z_dim"], 1, HEIGHT // VAE_SCALE, WIDTH // VAE_SCALE, device="meta")
    vae.clear_cache()
    dec(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=[0], first_chunk=True)
    entries = conv_entries("vae_decoder", vae, groups,
                           lambda: dec(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=[0]))
    frames_out = entries[-1]["tokens"] // (HEIGHT * WIDTH)
    assert frames_out == TEMPORAL, f"steady-state decode gave {frames_out} frames, expected {TEMPORAL}"
    return entries


def catalog_entry() -> dict[str, Any]:
    """The wan-causal-1.3b catalog document (JSON-ready): one latent frame (4 video frames) per step of play."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        umt5 = UMT5EncoderModel(UMT5Config(**UMT5_CONFIG))
        transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG)
        vae = AutoencoderKLWan(**VAE_CONFIG)
    text_blocks = t5_encoder_entries("umt5", umt5, TEXT_TOKENS)
    enc_blocks = _vae_encoder_entries(vae)
    dit_blocks = _transformer_entries(transformer)
    dec_blocks = _vae_decoder_entries(vae)
    cache_write = dit_blocks[:-1]  # the t=0 pass only needs the blocks' K/V: its output is discarded
    blocks = text_blocks + enc_blocks + dit_blocks + dec_blocks
    tokens = dit_blocks[1]["tokens"]
    return {
        "schema_version": CATALOG_SCHEMA_VERSION,
        "name": "wan-causal-1.3b",
        "source": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers configs (diffusers WanTransformer3DModel, AutoencoderKLWan; "
                  "transformers UMT5EncoderModel), instantiated on the meta device; causal schedule as Self-Forcing",
        "steps": STEPS,
        "context_frames": CONTEXT_FRAMES,
        "batch": 1,
        "kv_dtype": "bf16",
        "video_frames_per_latent": TEMPORAL,
        "blocks": blocks,
        "phases": [
            {"name": "encode", "per": "session", "passes": [
                transformer_pass(text_blocks, False, "none", "prompt -> 512 umT5-XXL token embeddings"),
                transformer_pass(enc_blocks, False, "none", "start image -> first latent frame"),
                transformer_pass(cache_write, False, "read+write",
                                 "start-latent cache write: t=0 pass, final layer skipped")]},
            {"name": "denoise", "per": "latent_frame", "passes": [
                transformer_pass(dit_blocks, True, "read",
                                 "denoising steps on the new latent frame; past frames read from the KV cache"),
                transformer_pass(cache_write, False, "read+write",
                                 "cache write: t=0 pass on the clean frame, final layer skipped")]},
            {"name": "decode", "per": "latent_frame", "passes": [
                transformer_pass(dec_blocks, False, "none",
                                 f"latent frame -> {TEMPORAL} RGB video frames (causal VAE cache primed)")]},
        ],
        "extra": {"video": f"{WIDTH}x{HEIGHT}", "latent": f"{HEIGHT // VAE_SCALE}x{WIDTH // VAE_SCALE}x16",
                  "tokens_per_frame": tokens, "text_tokens": TEXT_TOKENS,
                  "context": f"{CONTEXT_FRAMES} cached latent frames + the current one (rolling window)",
                  "params": params_by_component(blocks),
                  "flops_check": "analytic coefficients agree with torch FlopCounterMode on the meta device"},
    }
