"""The FLUX.1-schnell catalog entry: CLIP-L, T5-XXL, the 12B MMDiT and the VAE decoder at 1024×1024.

Built from the public configs on the meta device with diffusers/transformers (`pip install .[catalog]`).
"""

from __future__ import annotations

from typing import Any

import torch

from tools.catalog_common import (
    ACT_BYTES,
    CATALOG_SCHEMA_VERSION,
    block_flops,
    check_flops,
    conv_entries,
    count_flops,
    module_flops,
    params_by_component,
    t5_encoder_entries,
    tensors,
    transformer_pass,
)

# black-forest-labs/FLUX.1-schnell transformer/config.json (guidance_embeds false: schnell is
# guidance-distilled, so there is no guidance embedder — that is the difference from FLUX.1-dev).
TRANSFORMER_CONFIG = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                      "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                      "pooled_projection_dim": 768, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)}
# FLUX.1-schnell text_encoder/config.json (the text tower of openai/clip-vit-large-patch14).
CLIP_CONFIG = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
               "projection_dim": 768}
# FLUX.1-schnell text_encoder_2/config.json (google/t5-v1_1-xxl, encoder only).
T5_CONFIG = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
             "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
             "relative_attention_max_distance": 128, "tie_word_embeddings": False}
# FLUX.1-schnell vae/config.json: AutoencoderKL with 16 latent channels, no (post_)quant_conv.
VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
              "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu",
              "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
              "use_quant_conv": False, "use_post_quant_conv": False}

HEIGHT = WIDTH = 1024  # pixels
VAE_SCALE = 8  # spatial compression of the VAE
PATCH = 2  # latent pixels per token side (2×2 patches packed into in_channels = 16·4 = 64)
T5_TOKENS = 256  # schnell's max_sequence_length
CLIP_TOKENS = 77
STEPS = 4


def _clip_entries(model) -> list[dict]:
    """CLIP-L text layers: q, k, v, o (4·d²) and fc1, fc2 (2·d·d_ff) per token, ×2; attention 4·d per pair."""
    c = model.config
    d, d_ff, t = c.hidden_size, c.intermediate_size, CLIP_TOKENS
    text = getattr(model, "text_model", model)  # transformers < 5 nests the tower under text_model
    prefix = "text_model." if text is not model else ""
    entries = [{"name": "clip.embed", "component": "clip", "tokens": t, "flops_per_token": 0.0,
                "tensors": tensors([("embeddings", text.embeddings)]), "activation_bytes_per_token": d * ACT_BYTES}]
    for i, layer in enumerate(text.encoder.layers):
        entries.append({
            "name": f"clip.layers.{i}", "component": "clip", "tensors": tensors([("", layer)]), "tokens": t,
            "flops_per_token": 2.0 * (4 * d * d + 2 * d * d_ff),
            "self_attn_flops_per_token_pair": 4.0 * d,
            # x, residual, q/k/v and the MLP hidden; SDPA keeps no (tokens × tokens) score matrix
            "activation_bytes_per_token": (2 * d + 3 * d + d_ff) * ACT_BYTES,
        })
    entries.append({"name": "clip.final_norm", "component": "clip", "tokens": t, "flops_per_token": 0.0,
                    "tensors": tensors([("final_layer_norm", text.final_layer_norm)]),
                    "activation_bytes_per_token": 2 * d * ACT_BYTES})
    ids = torch.zeros(1, t, dtype=torch.long, device="meta")
    total, per_module, _ = count_flops(lambda: model(input_ids=ids))
    check_flops("clip layer 0", block_flops(entries[1]), module_flops(per_module, "CLIPTextModel",
                                                                      prefix + "encoder.layers.0"))
    check_flops("clip encoder", sum(block_flops(e) for e in entries), total)
    return entries


def _transformer_embed_entry(model, d: int, img: int) -> dict:
    """The embedders: x_embedder per image token; the timestep, pooled-CLIP and T5 embedders once per call."""
    c = model.config
    tte = model.time_text_embed
    freq = tte.timestep_embedder.linear_1.in_features
    return {
        "name": "transformer.embed", "component": "transformer", "tokens": img,
        "tensors": tensors([("time_text_embed", tte), ("context_embedder", model.context_embedder),
                            ("x_embedder", model.x_embedder)]),
        "flops_per_token": 2.0 * c.in_channels * d,  # x_embedder on each image token
        # timestep MLP (freq → d → d), pooled-CLIP MLP (768 → d → d), and the T5 sequence → d
        "fixed_flops": 2.0 * (freq * d + d * d + c.pooled_projection_dim * d + d * d
                              + T5_TOKENS * c.joint_attention_dim * d),
        "activation_bytes_per_token": (c.in_channels + d) * ACT_BYTES,
    }


def _double_block_entry(i: int, block, d: int, joint: int) -> dict:
    return {
        "name": f"transformer.double_blocks.{i}", "component": "transformer",
        "tensors": tensors([("", block)]), "tokens": joint,
        "flops_per_token": 2.0 * 12 * d * d, "fixed_flops": 2.0 * 2 * 6 * d * d,
        "self_attn_flops_per_token_pair": 4.0 * d,
        # x, residual, q/k/v and the 4d MLP hidden; SDPA keeps no (tokens × tokens) score matrix
        "activation_bytes_per_token": (2 * d + 3 * d + 4 * d) * ACT_BYTES,
    }


def _single_block_entry(i: int, block, d: int, joint: int) -> dict:
    return {
        "name": f"transformer.single_blocks.{i}", "component": "transformer",
        "tensors": tensors([("", block)]), "tokens": joint,
        "flops_per_token": 2.0 * (3 + 4 + 5) * d * d, "fixed_flops": 2.0 * 3 * d * d,
        "self_attn_flops_per_token_pair": 4.0 * d,
        # x, residual, q/k/v and the concatenated attention + MLP (5d) input of proj_out
        "activation_bytes_per_token": (2 * d + 3 * d + 5 * d) * ACT_BYTES,
    }


def _transformer_final_entry(model, d: int, img: int) -> dict:
    c = model.config
    return {
        "name": "transformer.final", "component": "transformer", "tokens": img,
        "tensors": tensors([("norm_out", model.norm_out), ("proj_out", model.proj_out)]),
        "flops_per_token": 2.0 * d * c.in_channels, "fixed_flops": 2.0 * d * 2 * d,  # adaLN d → 2d once
        "activation_bytes_per_token": (2 * d + c.in_channels) * ACT_BYTES,
    }


def _check_transformer_flops(model, entries: list[dict], img: int) -> None:
    """Counts one whole call on the meta device and checks the entries' FLOPs against it, block by block;
    raises (check_flops) on a mismatch."""
    c = model.config

    def run():
        return model(hidden_states=torch.empty(1, img, c.in_channels, device="meta"),
                     encoder_hidden_states=torch.empty(1, T5_TOKENS, c.joint_attention_dim, device="meta"),
                     pooled_projections=torch.empty(1, c.pooled_projection_dim, device="meta"),
                     timestep=torch.zeros(1, device="meta"),
                     img_ids=torch.zeros(img, 3, device="meta"), txt_ids=torch.zeros(T5_TOKENS, 3, device="meta"),
                     return_dict=False)

    total, per_module, _ = count_flops(run)
    root = type(model).__name__
    by_name = {e["name"]: e for e in entries}
    check_flops("transformer double block", block_flops(by_name["transformer.double_blocks.0"]),
                module_flops(per_module, root, "transformer_blocks.0"))
    check_flops("transformer single block", block_flops(by_name["transformer.single_blocks.0"]),
                module_flops(per_module, root, "single_transformer_blocks.0"))
    check_flops("transformer embeddings", block_flops(by_name["transformer.embed"]),
                sum(module_flops(per_module, root, p) for p in ("time_text_embed", "context_embedder", "x_embedder")))
    check_flops("transformer whole call", sum(block_flops(e) for e in entries), total)


def _transformer_entries(model) -> list[dict]:
    """The MMDiT. Every block sees the joint sequence: 4096 image + 256 text tokens attend to each other.

    Double block, per token: q, k, v, o (4·d²) and a 4× GELU MLP (8·d²) in the token's own stream, ×2 FLOPs;
    per call: two adaLN-Zero projections d → 6d of the conditioning. Single block, per token: qkv (3·d²),
    proj_mlp d → 4d and proj_out 5d → d, ×2; per call: adaLN d → 3d. Attention: 4·d per token pair.
    """
    c = model.config
    d = c.num_attention_heads * c.attention_head_dim
    img = (HEIGHT // VAE_SCALE // PATCH) * (WIDTH // VAE_SCALE // PATCH)
    joint = img + T5_TOKENS
    entries = [_transformer_embed_entry(model, d, img)]
    entries += [_double_block_entry(i, block, d, joint) for i, block in enumerate(model.transformer_blocks)]
    entries += [_single_block_entry(i, block, d, joint) for i, block in enumerate(model.single_transformer_blocks)]
    entries.append(_transformer_final_entry(model, d, img))
    _check_transformer_flops(model, entries, img)
    return entries


def _vae_decoder_entries(vae) -> list[dict]:
    dec = vae.decoder
    groups = [("conv_in", ["conv_in"]), ("mid_block", ["mid_block"])]
    groups += [(f"up_blocks.{i}", [f"up_blocks.{i}"]) for i in range(len(dec.up_blocks))]
    groups.append(("out", ["conv_norm_out", "conv_out"]))
    z = torch.empty(1, vae.config.latent_channels, HEIGHT // VAE_SCALE, WIDTH // VAE_SCALE, device="meta")
    return conv_entries("vae_decoder", dec, groups, lambda: dec(z))


def catalog_entry() -> dict[str, Any]:
    """The flux-schnell catalog document (JSON-ready): one image per 'latent_frame', each with its own prompt.

    Text-to-image users change the prompt per image, so the encoders run in every frame: keeping them
    resident (quantized) competes with the transformer for VRAM — the trade-off the planner must weigh."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))
        t5 = T5EncoderModel(T5Config(**T5_CONFIG))
        transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
    clip_blocks = _clip_entries(clip)
    t5_blocks = t5_encoder_entries("t5", t5, T5_TOKENS)
    dit_blocks = _transformer_entries(transformer)
    vae_blocks = _vae_decoder_entries(vae)
    blocks = clip_blocks + t5_blocks + dit_blocks + vae_blocks
    latent = f"{HEIGHT // VAE_SCALE}x{WIDTH // VAE_SCALE}x{VAE_CONFIG['latent_channels']}"
    return {
        "schema_version": CATALOG_SCHEMA_VERSION,
        "name": "flux-schnell",
        "source": "black-forest-labs/FLUX.1-schnell configs (diffusers FluxTransformer2DModel, AutoencoderKL; "
                  "transformers CLIPTextModel, T5EncoderModel), instantiated on the meta device",
        "steps": STEPS,
        "context_frames": 0,
        "batch": 1,
        "kv_dtype": "bf16",
        "video_frames_per_latent": 1,
        "blocks": blocks,
        "phases": [
            {"name": "encode", "per": "latent_frame", "passes": [
                transformer_pass(clip_blocks + t5_blocks, False, "none",
                                 "prompt -> pooled CLIP-L vector and 256 T5-XXL token embeddings")]},
            {"name": "denoise", "per": "latent_frame", "passes": [
                transformer_pass(dit_blocks, True, "none", "one MMDiT call per flow-matching step")]},
            {"name": "decode", "per": "latent_frame", "passes": [
                transformer_pass(vae_blocks, False, "none", f"{latent} latent -> {WIDTH}x{HEIGHT} RGB image")]},
        ],
        "extra": {"image": f"{WIDTH}x{HEIGHT}", "latent": latent,
                  "image_tokens": (HEIGHT // VAE_SCALE // PATCH) * (WIDTH // VAE_SCALE // PATCH),
                  "text_tokens": {"t5": T5_TOKENS, "clip": CLIP_TOKENS},
                  "params": params_by_component(blocks),
                  "flops_check": "analytic coefficients agree with torch FlopCounterMode on the meta device"},
    }
