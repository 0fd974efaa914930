"""The flux-schnell catalog entry: CLIP-L, T5-XXL, the 12B MMDiT and the VAE decoder at 1024×1024, 4 steps.

Each component is built from its published config with empty weights (accelerate `init_empty_weights`)
and traced by the module builder as the child of a FluxPipeline it is (`text_encoder`, `text_encoder_2`,
`transformer`, `vae`): block names are the module paths `residency.attach` sees on a real pipeline.
Needs the `catalog` extra (diffusers, transformers).
"""

from __future__ import annotations

from typing import Any

import torch

from pipelines.catalog_build.parts import catalog_document, trace_part
from residency.workload.pipeline_phases import ComponentPart, join_phases

# black-forest-labs/FLUX.1-schnell transformer/config.json (guidance_embeds false: schnell is
# guidance-distilled, so there is no guidance embedder — that is the difference from FLUX.1-dev).
TRANSFORMER_CONFIG = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                      "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                      "pooled_projection_dim": 768, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)}
# black-forest-labs/FLUX.1-schnell text_encoder/config.json (the text tower of openai/clip-vit-large-patch14).
CLIP_CONFIG = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
               "projection_dim": 768}
# black-forest-labs/FLUX.1-schnell text_encoder_2/config.json (google/t5-v1_1-xxl, encoder only).
T5_CONFIG = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
             "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
             "relative_attention_max_distance": 128, "tie_word_embeddings": False}
# black-forest-labs/FLUX.1-schnell vae/config.json: AutoencoderKL with 16 latent channels, no (post_)quant_conv.
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


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device="meta")


def _parts(clip, t5, transformer, vae) -> list[ComponentPart]:
    """Each component's forward at the shapes FluxPipeline calls it with for one 1024×1024 image."""
    latent_h, latent_w = HEIGHT // VAE_SCALE, WIDTH // VAE_SCALE
    image_tokens = (latent_h // PATCH) * (latent_w // PATCH)
    c = transformer.config
    denoise = {"hidden_states": _meta(1, image_tokens, c.in_channels),
               "encoder_hidden_states": _meta(1, T5_TOKENS, c.joint_attention_dim),
               "pooled_projections": _meta(1, c.pooled_projection_dim), "timestep": _meta(1),
               "img_ids": _meta(image_tokens, 3), "txt_ids": _meta(T5_TOKENS, 3), "return_dict": False}
    return [
        ComponentPart("text_encoder", "encode", False,
                      trace_part("text_encoder", clip, {"input_ids": _meta(1, CLIP_TOKENS, dtype=torch.long)},
                                 "text_encoder")),
        # the encoder's input embedding is `shared` in the checkpoint, run as encoder.embed_tokens: the copy
        # the forward never reads is left out (the published 4.76B counts the table once)
        ComponentPart("text_encoder_2", "encode", False,
                      trace_part("text_encoder_2", t5, {"input_ids": _meta(1, T5_TOKENS, dtype=torch.long)},
                                 "text_encoder_2", unused_ok=True)),
        ComponentPart("transformer", "denoise", True, trace_part("transformer", transformer, denoise, "transformer")),
        # text-to-image runs only the decoder: the VAE's encoder is left out on purpose
        ComponentPart("vae", "decode", False,
                      trace_part("vae", vae, {"z": _meta(1, vae.config.latent_channels, latent_h, latent_w),
                                              "return_dict": False}, "vae", call=vae.decode, unused_ok=True)),
    ]


def catalog_entry() -> dict[str, Any]:
    """The flux-schnell catalog document (JSON-ready): one image per 'latent_frame', each with its own prompt.

    Text-to-image users change the prompt per image, so the encoders run in every frame: keeping them
    resident (quantized) competes with the transformer for VRAM — the trade-off the planner must weigh.
    Cost: four meta forwards, ~10-15 s on a CPU (the 12B transformer is most of it)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with init_empty_weights():
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))
        t5 = T5EncoderModel(T5Config(**T5_CONFIG))
        transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
    workload = join_phases("flux-schnell", _parts(clip, t5, transformer, vae), STEPS,
                           source="black-forest-labs/FLUX.1-schnell configs (diffusers FluxTransformer2DModel, "
                                  "AutoencoderKL; transformers CLIPTextModel, T5EncoderModel) with empty weights, "
                                  "traced by residency.workload.module_workload")
    latent = f"{HEIGHT // VAE_SCALE}x{WIDTH // VAE_SCALE}x{VAE_CONFIG['latent_channels']}"
    return catalog_document(workload, {
        "image": f"{WIDTH}x{HEIGHT}", "latent": latent,
        "image_tokens": (HEIGHT // VAE_SCALE // PATCH) * (WIDTH // VAE_SCALE // PATCH),
        "text_tokens": {"text_encoder_2": T5_TOKENS, "text_encoder": CLIP_TOKENS},
        "components": {"text_encoder": "CLIP-L text tower", "text_encoder_2": "T5-v1.1-XXL encoder",
                       "transformer": "FLUX.1 MMDiT", "vae": "AutoencoderKL (decoder)"}})
