"""Example inputs a known model class implies from its config, for the workload's one counted forward.

Only where the config fixes every shape but the generation size, which comes from an ExampleSize (defaults:
each pipeline's own): a transformers model reading token ids (a batch of one prompt of EXAMPLE_TOKENS
tokens), a diffusers UNet2DConditionModel without extra conditioning (a latent of its configured
sample_size, a CLIP prompt of 77 tokens, as its pipeline pads one), a FluxTransformer2DModel (a 1024×1024 image: 4096 latent tokens, 512 prompt tokens, as
FluxPipeline runs it), a WanTransformer3DModel for text-to-video (480×832, 81 frames, 512 prompt tokens, as
WanPipeline runs it), and a VAE's decode of the latent of such an image or video. Anything else needs the
caller's example_inputs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from residency.errors import ResidencyError, UsageError
from residency.units import MAX_SIDE_PX, plural

EXAMPLE_TOKENS = 16  # prompt tokens of a derived example; a call with another length is refused
PIPELINE_PROMPT_TOKENS = 512  # FluxPipeline's and WanPipeline's max_sequence_length: T5 prompts are padded to it
CLIP_PROMPT_TOKENS = 77  # a UNet's pipeline (Stable Diffusion) pads its CLIP prompt to the tokenizer's 77 tokens
VAE_SCALE = 8  # pixels per latent pixel of the VAEs these models are paired with (SD, Flux, Wan)
VAE_SCALE_TEMPORAL = 4  # video frames per latent frame after the first (Wan's VAE)
FLUX_LATENT_SIZE = 128  # FluxPipeline.default_sample_size: 128 latent pixels a side, 1024 px at VAE_SCALE
WAN_HEIGHT, WAN_WIDTH, WAN_FRAMES = 480, 832, 81  # WanPipeline.__call__'s defaults
# the diffusers classes whose example inputs a config implies (derive); any transformers model reading token ids too
class ConfigFieldError(ResidencyError):
    """A field of the model's config the example cannot be derived from; its hint names the fix (exit 1)."""


DIFFUSERS_CLASSES = ("UNet2DConditionModel", "FluxTransformer2DModel", "WanTransformer3DModel", "UNet2DModel")


@dataclass(frozen=True)
class ExampleSize:
    """The generation a derived example stands for; None: the model's (its pipeline's) default.

    Cost: the counted forward runs on the meta device, so a larger size costs no memory, only its FLOPs."""
    height: int | None = None  # image or video height [px]
    width: int | None = None  # [px]
    frames: int | None = None  # video frames (Wan): 4k+1
    prompt_tokens: int | None = None  # text tokens the denoiser attends to (an encoder's padded prompt)
    batch: int = 1  # latents per call: 2 for a UNet run with classifier-free guidance batched
    # pixels per latent pixel (the pipeline's VAE); None: the model's own default, VAE_SCALE, except a bare
    # UNet2DModel's 1 (DDPMPipeline's, which runs it in pixel space: ×8 planned and labelled 8× its size)
    vae_scale: int | None = None
    vae_scale_temporal: int = VAE_SCALE_TEMPORAL  # video frames per latent frame (the pipeline's video VAE)

    def given(self) -> bool:
        """True when the user chose a height, width, frame count or token count."""
        return any(v is not None for v in (self.height, self.width, self.frames, self.prompt_tokens))


@dataclass(frozen=True)
class Derived:
    """A derived example and the generation it stands for, every size resolved."""
    example: dict[str, Any]
    size: ExampleSize  # height, width, frames and prompt tokens as the example has them (None: not applicable)

    @property
    def label(self) -> str:
        """The size in words: "1024×1024, 512 prompt tokens", "16 tokens"."""
        s = self.size
        if s.height is None:
            return plural(s.prompt_tokens, "token")
        frames = f", {plural(s.frames, 'frame')}" if s.frames is not None else ""
        prompt = f", {plural(s.prompt_tokens, 'prompt token')}" if s.prompt_tokens is not None else ""
        return f"{s.height}×{s.width}{frames}{prompt}"


def is_instance_of(obj: object, module: str, cls: str) -> bool:
    """isinstance against a library class, without importing the library (seconds) when it is not loaded."""
    lib = sys.modules.get(module)
    return lib is not None and isinstance(obj, getattr(lib, cls, ()))


def derived_example(model: nn.Module, size: ExampleSize | None = None) -> dict[str, Any]:
    """The example inputs `model`'s config implies; a ResidencyError saying what to pass where none does."""
    return derive(model, size).example


def derive(model: nn.Module, size: ExampleSize | None = None) -> Derived:
    """derived_example and the size it stands for; ResidencyError for a size the model cannot take."""
    size = size or ExampleSize()
    if is_instance_of(model, "transformers", "PreTrainedModel"):
        return _transformers_example(model, size)
    for cls in DIFFUSERS_CLASSES:
        if is_instance_of(model, "diffusers", cls):
            if size.vae_scale is None:
                size = replace(size, vae_scale=1 if cls == "UNet2DModel" else VAE_SCALE)
            return _DIFFUSERS_EXAMPLES[cls](model, size)
    raise ResidencyError(
        f"{type(model).__name__}: residency cannot tell the shapes of its inputs from the model alone",
        hint="pass example_inputs=, the inputs of one call at the shapes you will run (a tensor, a tuple of "
             "positional inputs or a dict of keyword inputs), e.g. residency.attach(model, vram=…, "
             f"example_inputs=dict({_forward_inputs(model)}))")


def _forward_inputs(model: nn.Module) -> str:
    """The model's own required forward inputs for the hint ("sample=…"), else a generic pair."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.default is p.empty
             and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return ", ".join(f"{n}=…" for n in names[:4]) if names else "x=…"


def vae_decode_example(vae: nn.Module, size: ExampleSize, video: bool) -> Derived:
    """The latent a pipeline hands its VAE's decode for an image (AutoencoderKL) or a video (AutoencoderKLWan)
    of `size` (height and width required: the denoiser's resolved size)."""
    name = type(vae).__name__
    c = vae.config
    if name == "AutoencoderKLWan" and video:
        channels, frames = c.z_dim, (size.frames - 1) // size.vae_scale_temporal + 1
        shape: tuple[int, ...] = (1, channels, frames, size.height // size.vae_scale, size.width // size.vae_scale)
    elif name == "AutoencoderKL" and not video:
        shape = (1, c.latent_channels, size.height // size.vae_scale, size.width // size.vae_scale)
    else:
        raise ResidencyError(f"{name}: residency cannot tell the latent its decode reads for this pipeline",
                             hint="plan the pipeline from Python: residency.attach(pipe, vram=…)")
    latent = torch.zeros(shape, dtype=_dtype(vae))
    return Derived({"z": latent, "return_dict": False}, size)


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _multiple(model: str, what: str, value: int, of: int) -> None:
    if value <= 0 or value % of:
        near = max(of, round(value / of) * of)
        raise UsageError(f"{model}: {what} {value} is not a positive multiple of {of} (the VAE's scale × the "
                         "model's patch)", hint=f"e.g. {near}")


def _refuse_frames(model: str, size: ExampleSize) -> None:
    if size.frames is not None:
        raise UsageError(f"{model} makes images: a frame count does not apply", hint="leave out --frames")


def _transformers_example(model: nn.Module, size: ExampleSize) -> Derived:
    name = type(model).__name__
    main = getattr(model, "main_input_name", "input_ids")
    if main != "input_ids":
        raise ResidencyError(f"{name} reads {main!r}, not token ids: its input shapes are not "
                             "in its config", hint=f"pass example_inputs=dict({main}=…) at the shape you will run")
    if any(v is not None for v in (size.height, size.width, size.frames)):
        raise UsageError(f"{name} reads token ids: a height, width or frame count does not apply",
                         hint="leave out --height, --width and --frames")
    limit, field = _max_positions(model.config)
    if size.prompt_tokens and limit and size.prompt_tokens > limit:  # a call the model cannot run
        raise UsageError(f"{name} takes at most {limit} tokens (its config's {field}); {size.prompt_tokens} asked",
                         hint=f"give --tokens {limit} or fewer")
    tokens = size.prompt_tokens or (min(EXAMPLE_TOKENS, limit) if limit else EXAMPLE_TOKENS)
    ids = torch.zeros(1, tokens, dtype=torch.long)  # token 0 is in every vocabulary
    example: dict[str, Any] = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        example["decoder_input_ids"] = ids.clone()
    return Derived(example, ExampleSize(prompt_tokens=ids.shape[1]))


def _max_positions(config: Any) -> tuple[int | None, str]:
    """The longest sequence a transformers config's positions allow, and the field saying so (None: no limit
    given, as for relative or rotary positions without one)."""
    for field in ("n_positions", "max_position_embeddings", "max_sequence_length"):  # GPT-2 aliases the first
        v = getattr(config, field, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v, field
    return None, ""


def _unet_example(model: nn.Module, size: ExampleSize) -> Derived:
    c = model.config
    extra = [k for k in ("addition_embed_type", "class_embed_type") if c.get(k) is not None]
    sample = c.get("sample_size")
    # one side, or [height, width] (diffusers takes both)
    sides = (sample, sample) if isinstance(sample, int) else tuple(sample) if isinstance(sample, list | tuple) else ()
    why = ""
    if extra:
        why = f"its config sets {', '.join(extra)}"
    elif len(sides) != 2 or not all(isinstance(v, int) for v in sides):
        why = f"its config's sample_size is {sample!r}, not a side or [height, width]"
    elif not isinstance(c.get("cross_attention_dim"), int):
        why = "its config has no single cross_attention_dim"
    if why:
        raise ResidencyError(f"UNet2DConditionModel: {why}; residency cannot build its example inputs",
                             hint="pass example_inputs=dict(sample=…, timestep=…, encoder_hidden_states=…, …)")
    _refuse_frames("UNet2DConditionModel", size)
    if min(sides) <= 0 and not (size.height and size.width):  # the config's fault, not a flag's (exit 1, not 2)
        raise ConfigFieldError(f"UNet2DConditionModel: its config.json's sample_size is {sample}, not a positive "
                             "number of latent pixels", hint="fix sample_size, or give --height and --width")
    if max(sides) * size.vae_scale > MAX_SIDE_PX and not (size.height and size.width):  # its example did not fit in RAM
        raise ConfigFieldError(f"UNet2DConditionModel: its config.json's sample_size is {sample} latent pixels, "
                             f"{max(sides) * size.vae_scale} px a side at VAE scale {size.vae_scale}: over the "
                             f"{MAX_SIDE_PX} px residency plans", hint="fix sample_size, or give --height and --width")
    height, width = size.height or sides[0] * size.vae_scale, size.width or sides[1] * size.vae_scale
    for what, v in (("height", height), ("width", width)):
        _multiple("UNet2DConditionModel", what, v, size.vae_scale)
    tokens = size.prompt_tokens or CLIP_PROMPT_TOKENS
    dtype = _dtype(model)
    b = size.batch
    example = {"sample": torch.zeros(b, c.in_channels, height // size.vae_scale, width // size.vae_scale,
                                     dtype=dtype),
               "timestep": torch.ones(b, dtype=dtype),
               "encoder_hidden_states": torch.zeros(b, tokens, c.cross_attention_dim, dtype=dtype),
               "return_dict": False}
    return Derived(example, replace(size, height=height, width=width, prompt_tokens=tokens))


def _unet2d_example(model: nn.Module, size: ExampleSize) -> Derived:
    """An unconditional UNet2DModel (DDPMPipeline's: pixel space, unless a pipeline's VAE scale is given): sample and
    timestep."""
    c = model.config
    sample = c.get("sample_size")
    if c.get("class_embed_type") is not None or not isinstance(sample, int) or sample <= 0:
        why = (f"its config sets class_embed_type {c.get('class_embed_type')!r}" if c.get("class_embed_type")
               is not None else f"its config's sample_size is {sample!r}, not one positive side")
        raise ResidencyError(f"UNet2DModel: {why}; residency cannot build its example inputs",
                             hint="pass example_inputs=dict(sample=…, timestep=…, …)")
    _refuse_frames("UNet2DModel", size)
    height, width = size.height or sample * size.vae_scale, size.width or sample * size.vae_scale
    for what, v in (("height", height), ("width", width)):
        _multiple("UNet2DModel", what, v, size.vae_scale)
    if max(height, width) > MAX_SIDE_PX:
        raise UsageError(f"UNet2DModel: {max(height, width)} px a side is over the {MAX_SIDE_PX} px residency plans",
                         hint="give a smaller --height and --width")
    dtype, b = _dtype(model), size.batch
    example = {"sample": torch.zeros(b, c.in_channels, height // size.vae_scale, width // size.vae_scale, dtype=dtype),
               "timestep": torch.ones(b, dtype=dtype), "return_dict": False}
    return Derived(example, replace(size, height=height, width=width, prompt_tokens=None))


def _flux_example(model: nn.Module, size: ExampleSize) -> Derived:
    """FluxPipeline's call: the latent packed 2×2 into tokens of in_channels (4 latent channels each)."""
    c = model.config
    _refuse_frames("FluxTransformer2DModel", size)
    pack = size.vae_scale * 2  # the pipeline packs 2×2 latent pixels into one token
    height = size.height or FLUX_LATENT_SIZE * size.vae_scale
    width = size.width or FLUX_LATENT_SIZE * size.vae_scale
    for what, v in (("height", height), ("width", width)):
        _multiple("FluxTransformer2DModel", what, v, pack)
    image, text = (height // pack) * (width // pack), size.prompt_tokens or PIPELINE_PROMPT_TOKENS
    dtype = _dtype(model)
    example: dict[str, Any] = {
        "hidden_states": torch.zeros(size.batch, image, c.in_channels, dtype=dtype),
        "encoder_hidden_states": torch.zeros(size.batch, text, c.joint_attention_dim, dtype=dtype),
        "pooled_projections": torch.zeros(size.batch, c.pooled_projection_dim, dtype=dtype),
        "timestep": torch.ones(size.batch, dtype=dtype),
        "img_ids": torch.zeros(image, 3, dtype=dtype),  # positions: their values do not change the cost
        "txt_ids": torch.zeros(text, 3, dtype=dtype),
        "return_dict": False}
    if c.get("guidance_embeds"):
        example["guidance"] = torch.ones(size.batch, dtype=dtype)
    return Derived(example, replace(size, height=height, width=width, prompt_tokens=text))


def _wan_example(model: nn.Module, size: ExampleSize) -> Derived:
    """WanPipeline's text-to-video call: a latent of (frames-1)/4+1 frames at 1/8 of the pixels."""
    c = model.config
    if c.get("image_dim") is not None:
        raise ResidencyError("WanTransformer3DModel: its config sets image_dim (image-to-video): the image "
                             "conditioning's shapes are not derived",
                             hint="pass example_inputs=dict(hidden_states=…, timestep=…, "
                                  "encoder_hidden_states=…, encoder_hidden_states_image=…)")
    _, p_h, p_w = c.patch_size
    height, width = size.height or WAN_HEIGHT, size.width or WAN_WIDTH
    frames = size.frames if size.frames is not None else WAN_FRAMES
    _multiple("WanTransformer3DModel", "height", height, size.vae_scale * p_h)
    _multiple("WanTransformer3DModel", "width", width, size.vae_scale * p_w)
    if frames < 1 or (frames - 1) % size.vae_scale_temporal:
        near = max(1, round((frames - 1) / size.vae_scale_temporal)) * size.vae_scale_temporal + 1
        raise UsageError(f"WanTransformer3DModel: {frames} frames is not {size.vae_scale_temporal}k+1 (the VAE "
                         f"keeps the first frame and packs the others by {size.vae_scale_temporal})",
                         hint=f"e.g. {near}")
    latent_frames = (frames - 1) // size.vae_scale_temporal + 1
    _check_wan_rope(c, size, (latent_frames, height // size.vae_scale, width // size.vae_scale), (height, width, frames))
    text = size.prompt_tokens or PIPELINE_PROMPT_TOKENS
    dtype = _dtype(model)
    example = {"hidden_states": torch.zeros(size.batch, c.in_channels, latent_frames, height // size.vae_scale,
                                            width // size.vae_scale, dtype=dtype),
               "timestep": torch.ones(size.batch, dtype=dtype),
               "encoder_hidden_states": torch.zeros(size.batch, text, c.text_dim, dtype=dtype),
               "return_dict": False}
    return Derived(example, replace(size, height=height, width=width, frames=frames, prompt_tokens=text))


def _check_wan_rope(c: Any, size: ExampleSize, latent: tuple[int, int, int], pixels: tuple[int, int, int]) -> None:
    """Wan's rotary table holds rope_max_seq_len positions per axis: a video with more patches along one is a
    call the model cannot run (counted, it failed deep in the rotary embedding, blamed on missing weights)."""
    table = c.get("rope_max_seq_len")
    if not isinstance(table, int) or isinstance(table, bool):
        return
    patches = tuple(n // p for n, p in zip(latent, c.patch_size, strict=True))
    if max(patches) <= table:
        return
    height, width, frames = pixels
    what = f"{height}×{width}, {frames} frames"
    axes = ", ".join(f"{n} along {axis}" for n, axis in zip(patches, ("time", "height", "width"), strict=True)
                     if n > table)
    message = (f"WanTransformer3DModel: at {what} the video is {'×'.join(map(str, patches))} patches, more than its "
               f"config's rope_max_seq_len ({table}) positions per axis ({axes})")
    if size.height or size.width or size.frames is not None:
        raise UsageError(message, hint="give a smaller --height, --width or --frames")
    raise ConfigFieldError(message + " at the pipeline's default size",
                           hint="give --height, --width and --frames the model can take, or fix rope_max_seq_len")


_DIFFUSERS_EXAMPLES = {"UNet2DConditionModel": _unet_example, "FluxTransformer2DModel": _flux_example,
                       "WanTransformer3DModel": _wan_example, "UNet2DModel": _unet2d_example}
