"""The wan-causal-1.3b catalog entry: a Wan2.1-T2V-1.3B causal world model (Self-Forcing / Matrix-Game 2 family).

umT5-XXL, the 30-block DiT with a rolling KV window, and the Wan VAE at 480×832, each built from its
published config with empty weights (accelerate `init_empty_weights`) and traced by the module builder as
the child of a WanPipeline it is (`text_encoder`, `transformer`, `vae`). diffusers' Wan transformer has no
KV cache: its blocks are traced cache-less on one latent frame, and what the causal schedule adds — K/V
of every token kept for later frames, attention of each query to the cached keys — is read from the
blocks' self-attention module (its K and V widths; a cached pair costs what an own-frame pair does).
Needs the `catalog` extra (diffusers, transformers).
"""

from __future__ import annotations

from typing import Any

import torch

from pipelines.catalog_build.parts import (
    catalog_document,
    forward_blocks,
    phase,
    self_attention_pair_flops,
    trace_part,
    with_cache,
)
from residency.workload.spec import Workload

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
# The VAE's causal cache is primed by a call outside the trace: the traced call runs in the dtype of that
# call, the model's own float32 (the counts are the same in any dtype; the catalog states bytes at 2 bytes).
_VAE_DTYPE = "fp32"


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device="meta")


def _vae_parts(vae) -> tuple[Workload, Workload]:
    """The encoder on the start image (one frame: the causal VAE's first chunk) -> the first latent frame;
    the decoder in its steady state: a latent frame after the first (its causal cache primed) -> TEMPORAL
    video frames."""
    def encode(image: torch.Tensor) -> torch.Tensor:
        vae.clear_cache()
        return vae.quant_conv(vae.encoder(image, feat_cache=vae._enc_feat_map, feat_idx=[0]))

    def decode(z: torch.Tensor) -> torch.Tensor:
        out = vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=[0])
        if out.shape[2] != TEMPORAL:
            raise AssertionError(f"steady-state decode gave {out.shape[2]} frames, expected {TEMPORAL}")
        return out

    encoder = trace_part("vae", vae, _meta(1, 3, 1, HEIGHT, WIDTH), "vae", call=encode, unused_ok=True,
                         compute_dtype=_VAE_DTYPE)
    z = _meta(1, VAE_CONFIG["z_dim"], 1, HEIGHT // VAE_SCALE, WIDTH // VAE_SCALE)
    vae.clear_cache()
    vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=[0], first_chunk=True)
    decoder = trace_part("vae", vae, z, "vae", call=decode, unused_ok=True,
                         compute_dtype=_VAE_DTYPE)
    return encoder, decoder


def _transformer(transformer) -> Workload:
    """One cache-less call on a latent frame, its blocks given the KV fields of the causal schedule."""
    c = transformer.config
    example = {"hidden_states": _meta(1, c.in_channels, 1, HEIGHT // VAE_SCALE, WIDTH // VAE_SCALE),
               "timestep": _meta(1), "encoder_hidden_states": _meta(1, TEXT_TOKENS, c.text_dim), "return_dict": False}
    traced = trace_part("transformer", transformer, example, "transformer")
    blocks = []
    for b in traced.blocks:
        if b.modules and b.modules[0].startswith("transformer.blocks."):
            attn = transformer.get_submodule(b.modules[0][len("transformer."):]).attn1
            b = with_cache(b, self_attention_pair_flops(attn), attn.to_k.out_features + attn.to_v.out_features)
        blocks.append(b)
    return Workload(traced.name, tuple(blocks), traced.phases, steps=1, context_frames=0)


def catalog_entry() -> dict[str, Any]:
    """The wan-causal-1.3b catalog document (JSON-ready): one latent frame (4 video frames) per step of play.
    Cost: four meta forwards and a primed decoder call, ~15-20 s on a CPU."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with init_empty_weights():
        umt5 = UMT5EncoderModel(UMT5Config(**UMT5_CONFIG))
        transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG)
        vae = AutoencoderKLWan(**VAE_CONFIG)
    # umT5's input embedding is `shared`, run as encoder.embed_tokens: the unread copy is left out
    text = trace_part("text_encoder", umt5, {"input_ids": _meta(1, TEXT_TOKENS, dtype=torch.long)}, "text_encoder",
                      unused_ok=True)
    encoder, decoder = _vae_parts(vae)
    dit = _transformer(transformer)
    dit_blocks = forward_blocks(dit)
    cache_write = dit_blocks[:-1]  # the t=0 pass only needs the blocks' K/V: the final layer is skipped
    workload = Workload(
        name="wan-causal-1.3b", blocks=(*text.blocks, *encoder.blocks, *dit.blocks, *decoder.blocks),
        phases=(
            phase("encode", "session",
                  (forward_blocks(text), False, "none", f"prompt -> {TEXT_TOKENS} umT5-XXL token embeddings"),
                  (forward_blocks(encoder), False, "none", "start image -> first latent frame"),
                  (cache_write, False, "read+write", "start-latent cache write: t=0 pass, final layer skipped")),
            phase("denoise", "latent_frame",
                  (dit_blocks, True, "read", "denoising steps on the new latent frame; past frames read from the KV "
                                             "cache"),
                  (cache_write, False, "read+write", "cache write: t=0 pass on the clean frame, final layer skipped")),
            phase("decode", "latent_frame",
                  (forward_blocks(decoder), False, "none",
                   f"latent frame -> {TEMPORAL} RGB video frames (causal VAE cache primed)"))),
        steps=STEPS, context_frames=CONTEXT_FRAMES, batch=1, kv_dtype="bf16", video_frames_per_latent=TEMPORAL,
        source="Wan-AI/Wan2.1-T2V-1.3B-Diffusers configs (diffusers WanTransformer3DModel, AutoencoderKLWan; "
               "transformers UMT5EncoderModel) with empty weights, traced by residency.workload.module_workload; "
               "causal schedule as Self-Forcing")
    tokens = next(b.tokens for b in dit.blocks if b.kv_channels_per_token)
    return catalog_document(workload, {
        "video": f"{WIDTH}x{HEIGHT}", "latent": f"{HEIGHT // VAE_SCALE}x{WIDTH // VAE_SCALE}x{VAE_CONFIG['z_dim']}",
        "tokens_per_frame": tokens, "text_tokens": TEXT_TOKENS,
        "context": f"{CONTEXT_FRAMES} cached latent frames + the current one (rolling window)",
        "components": {"text_encoder": "umT5-XXL encoder", "transformer": "Wan2.1 1.3B DiT",
                       "vae": "Wan 2.1 causal 3D VAE (encoder and decoder)"}})
