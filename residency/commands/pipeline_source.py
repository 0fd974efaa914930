"""A diffusers pipeline directory planned from its configs alone: text encoders → denoiser × steps → VAE
decode, each component built empty and counted on meta at the example the configs imply.

residency.attach_pipeline finds each component's inputs in one real call of a live pipeline; here there is
no pipeline to call, so the inputs are derived: an encoder reads its tokenizer's model_max_length tokens
(the last encoder, the one the denoiser attends to, the pipeline's max_sequence_length), the denoiser the
latent of the pipeline's default resolution (or the one asked for), the VAE decodes that latent; with the
pipeline's default guidance, encoders and a transformer run twice (a UNet once, on a batch of 2). For a
Flux pipeline this is exactly the workload of a real call; an encoder handed an attention mask too (Wan's)
runs a few more ops than counted, at the same FLOPs. Cost: one meta forward per component (no memory, no
weights read; about a second for a tiny pipeline).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from residency.commands.config_source import (
    MODEL_CONFIG,
    PIPELINE_INDEX,
    empty_model,
    is_model_dir,
    read_config,
)
from residency.errors import ResidencyError, UsageError
from residency.inventory import module_tensors
from residency.workload.spec import MAX_STEPS

DEFAULT_STEPS = 28  # denoise steps where the pipeline's __call__ names no default (FluxPipeline's own)
_HINT = "give the directory DiffusionPipeline.save_pretrained wrote (model_index.json and one folder per component)"


@dataclass(frozen=True)
class Component:
    """One entry of model_index.json: the pipeline attribute and the class its subfolder holds."""
    name: str  # "text_encoder_2", "transformer", "vae", "scheduler", …
    library: str  # "diffusers", "transformers", or a diffusers pipeline module ("stable_diffusion")
    class_name: str


def read_index(path: Path) -> tuple[str, list[Component]]:
    """The pipeline class and its components from `path`/model_index.json: every list entry; [null, null] ones
    (a component saved as None, e.g. safety_checker) and plain values (settings) are left out. ResidencyError
    naming the field for a list that is not [library, class]."""
    index_path = path / PIPELINE_INDEX
    index = read_config(index_path)
    pipe_class = index.get("_class_name")
    if not isinstance(pipe_class, str):
        raise ResidencyError(f"{index_path}: _class_name is {pipe_class!r}, not a pipeline class name", hint=_HINT)
    components = []
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list) or value == [None, None]:
            continue  # metadata, a pipeline setting (Wan's expand_timesteps), or a component saved as None
        if not (len(value) == 2 and all(isinstance(v, str) for v in value)):
            raise ResidencyError(f"{index_path}: component {key!r} is {str(value)[:80]}, not [library, class]",
                                 hint=f"e.g. \"{key}\": [\"diffusers\", \"AutoencoderKL\"]; {_HINT}")
        components.append(Component(key, value[0], value[1]))
    return pipe_class, components


@contextmanager
def _quiet_imports() -> Iterator[None]:
    """transformers at error level while pipeline classes are looked up: importing one loads its image
    processors, which log about torchvision (unused here) on every run."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _library_class(path: Path, comp: Component) -> Any:
    """The class a component names; ResidencyError when the installed library lacks it."""
    module = comp.library if comp.library in ("diffusers", "transformers") else f"diffusers.pipelines.{comp.library}"
    try:
        lib = importlib.import_module(module)
    except ImportError as e:
        raise ResidencyError(f"{path / PIPELINE_INDEX}: component {comp.name!r} names library {comp.library!r}, "
                             f"which cannot be imported ({e})",
                             hint="pip install 'residency[catalog]', or update diffusers and transformers") from e
    cls = getattr(lib, comp.class_name, None)
    if not isinstance(cls, type):
        version = getattr(importlib.import_module(module.split(".")[0]), "__version__", "?")
        raise ResidencyError(f"{path / PIPELINE_INDEX}: component {comp.name!r} names {comp.library}."
                             f"{comp.class_name}, which the installed {module.split('.')[0]} {version} lacks",
                             hint="update it, or fix the class name")
    return cls


def _refuse_missing_components(path: Path, pipe_class: Any, components: list[Component]) -> None:
    """Refuse, as DiffusionPipeline.from_pretrained refuses it, a directory lacking components its pipeline class
    takes without a default: Flux's components under `_class_name` StableDiffusionPipeline were planned at Stable
    Diffusion's 50 steps and guidance, a directory diffusers does not load. A component saved as None ([null, null])
    counts as given, as diffusers counts it."""
    index = read_config(path / PIPELINE_INDEX)
    given = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    optional = set(getattr(pipe_class, "_optional_components", None) or ())
    params = inspect.signature(pipe_class.__init__).parameters
    needed = [k for k, p in params.items() if k != "self" and p.default is inspect.Parameter.empty
              and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [k for k in needed if k not in given and k not in optional]
    if missing:
        raise ResidencyError(f"{path / PIPELINE_INDEX}: _class_name {pipe_class.__name__} takes the components "
                             f"{', '.join(missing)}, which the directory does not name (diffusers does not load it)",
                             hint="fix _class_name to the pipeline these components are of (save_pretrained writes it)")


def _pipeline_class(path: Path, name: str) -> Any:
    import diffusers

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise ResidencyError(f"{path / PIPELINE_INDEX}: _class_name {name!r} is not a pipeline of the installed "
                             f"diffusers {diffusers.__version__}", hint="update diffusers, or fix _class_name")
    return cls


def _call_default(pipe_class: Any, arg: str) -> Any:
    param = inspect.signature(pipe_class.__call__).parameters.get(arg)
    return None if param is None else param.default


def _prompt_tokens(path: Path, encoder: str, model: nn.Module, padded_to: Any) -> int:
    """Tokens an encoder reads: `padded_to` (the pipeline's max_sequence_length, for the last encoder) if an
    int, else its tokenizer's model_max_length, else its position table's length."""
    from residency.front_door.examples import PIPELINE_PROMPT_TOKENS

    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(padded_to, int) and not isinstance(padded_to, bool) and padded_to > 0:
        return padded_to
    tokenizer = path / encoder.replace("text_encoder", "tokenizer") / "tokenizer_config.json"
    if tokenizer.is_file():
        length = read_config(tokenizer).get("model_max_length")
        # an unset length is saved as a huge number (transformers' VERY_LARGE_INTEGER): the table bounds it
        if isinstance(length, int) and not isinstance(length, bool) and 0 < length and (limit is None or
                                                                                         length <= limit):
            return length
    return limit if isinstance(limit, int) and limit > 0 else PIPELINE_PROMPT_TOKENS


def _vae_scales(vae: nn.Module) -> tuple[int, int]:
    """(spatial, temporal) pixels per latent pixel, as the pipelines compute them from the VAE's config."""
    c = vae.config
    spatial = c.get("scale_factor_spatial") or 2 ** (len(c.get("block_out_channels", [0])) - 1)
    return int(spatial), int(c.get("scale_factor_temporal") or 1)


def _guided(pipe_class: Any, denoiser: nn.Module) -> bool:
    """True when the pipeline's defaults run classifier-free guidance (a conditional and an unconditional
    prediction per step): true_cfg_scale > 1 where the pipeline has one (Flux), else guidance_scale > 1 for
    a denoiser that does not embed the guidance (Flux-dev does)."""
    true_cfg = _call_default(pipe_class, "true_cfg_scale")
    if isinstance(true_cfg, int | float):
        return true_cfg > 1
    scale = _call_default(pipe_class, "guidance_scale")
    return isinstance(scale, int | float) and scale > 1 and not denoiser.config.get("guidance_embeds", False)


def _planned_components(path: Path, components, classes: dict, roles: dict[str, str]) -> dict[str, nn.Module]:
    """The components with a phase, built empty from their folders; a weight-bearing component in no phase is
    refused (planning without it would understate the pipeline)."""
    planned: dict[str, nn.Module] = {}
    for comp in components:
        if comp.name in roles:
            planned[comp.name] = empty_model(path / comp.name, (comp.library, comp.class_name))
        elif issubclass(classes[comp.name], nn.Module):
            raise ResidencyError(
                f"{path / PIPELINE_INDEX}: component {comp.name!r} ({comp.class_name}) holds weights but runs in "
                f"no phase residency knows (it plans {', '.join(roles)})",
                hint=f"plan a copy whose model_index.json sets \"{comp.name}\": [null, null], or plan the "
                     "denoiser's directory alone")
    return planned


def component_tensors(path: Path) -> tuple[list[tuple[str, tuple[int, ...], str]], list[str]]:
    """(name, shape, "BF16") of every parameter and floating buffer of each weight-bearing component of the
    pipeline in `path`, built empty from its folder: what its files hold, whichever modules one call runs (inspect
    when that call cannot be traced); and the components of a pipeline's own module (Stable Diffusion's
    safety_checker), which are built from no config residency reads, left out. Its components' own errors (a
    config.json missing) are raised."""
    _, components = read_index(path)
    with _quiet_imports():
        classes = {comp.name: _library_class(path, comp) for comp in components}
    named: list[tuple[str, tuple[int, ...], str]] = []
    left_out = []
    for comp in components:
        if not issubclass(classes[comp.name], nn.Module):  # a scheduler, a tokenizer, a feature extractor
            continue
        if comp.library not in ("diffusers", "transformers"):
            left_out.append(f"{comp.name} ({comp.class_name})")
            continue
        model = empty_model(path / comp.name, (comp.library, comp.class_name))
        named += [(f"{comp.name}.{n}", tuple(shape), "BF16") for n, shape, _ in module_tensors(model)]
    return named, left_out


def _traced(path: Path, comp: str, root: nn.Module, example: Any, compute_dtype: str):
    """One component's workload, traced on meta as the pipeline calls it (`root`: a ComponentCall)."""
    from residency.workload import ModuleWorkloadWarning, module_workload

    with warnings.catch_warnings():
        if comp == "vae":  # its encoder never runs in text-to-image, its decoder may run per frame
            warnings.simplefilter("ignore", ModuleWorkloadWarning)
        try:
            return module_workload(root, example, name=comp, component=comp, compute_dtype=compute_dtype)
        except ResidencyError as e:  # a forward meta cannot run (a size past a table the config sizes)
            raise ResidencyError(f"{path}: {e.message}", hint="try a smaller --height/--width/--frames, or "
                                 "plan the pipeline from Python: residency.attach(pipe, vram=…)") from e


def pipeline_dir_workload(path: Path, compute_dtype: str, size=None, steps_given: bool = False):
    """The workload of one call of the pipeline in `path` (encode → denoise × its default steps → decode), at
    `size` (an ExampleSize of height/width/frames; None: the pipeline's defaults), from configs only."""
    from residency.attach_pipeline import DENOISERS, ENCODERS, ROLES
    from residency.front_door.examples import ConfigFieldError, ExampleSize, derive, vae_decode_example
    from residency.workload.pipeline_phases import ComponentCall, ComponentPart, join_phases

    size = size or ExampleSize()
    pipe_name, components = read_index(path)
    if is_model_dir(path):  # both files at the top: which one the user meant is not known, so say which was read
        print(f"note: {path} holds both {PIPELINE_INDEX} and a model's {MODEL_CONFIG}: planned as the pipeline "
              f"{PIPELINE_INDEX} describes; for the one model, give it a directory of its own", file=sys.stderr)
    with _quiet_imports():
        pipe_class = _pipeline_class(path, pipe_name)
        _refuse_missing_components(path, pipe_class, components)
        classes = {comp.name: _library_class(path, comp) for comp in components}
    roles = {comp: phase for comp, phase, _, _ in ROLES}  # the phases attach_pipeline plans, and their calls
    methods = {comp: method for comp, _, _, method in ROLES}
    planned = _planned_components(path, components, classes, roles)
    denoisers = [d for d in DENOISERS if d in planned]
    if not denoisers:
        raise ResidencyError(f"{path / PIPELINE_INDEX}: no {' or '.join(DENOISERS)} component", hint=_HINT)
    denoiser_name = denoisers[0]
    # no VAE: a pixel-space pipeline (DDPMPipeline): the denoiser works on the image itself, nothing decodes it
    denoiser, vae = planned[denoiser_name], planned.get("vae")
    guided = _guided(pipe_class, denoiser)
    encoders = [e for e in ENCODERS if e in planned]
    tokens = {e: _prompt_tokens(path, e, planned[e], _call_default(pipe_class, "max_sequence_length")
                                if e == encoders[-1] else None) for e in encoders}
    if encoders and size.prompt_tokens is not None:  # --tokens: the prompt the denoiser attends to, as encoded
        padded = tokens[encoders[-1]]
        takes_length = "max_sequence_length" in inspect.signature(pipe_class.__call__).parameters  # (default None too)
        if not takes_length and size.prompt_tokens != padded:
            # Stable Diffusion's pipelines pad every prompt to the tokenizer's length: a plan at 7 tokens is for a
            # call they never make (its ms and activations read lower than any real call's)
            raise UsageError(f"{path}: --tokens {size.prompt_tokens}: {pipe_class.__name__} pads every prompt to "
                             f"{padded} tokens (its {encoders[-1].replace('text_encoder', 'tokenizer')}'s "
                             "model_max_length) and takes no max_sequence_length",
                             hint=f"leave --tokens out (or give --tokens {padded})")
        tokens[encoders[-1]] = size.prompt_tokens
    spatial, temporal = _vae_scales(vae) if vae is not None else (1, 1)
    batched = guided and denoiser_name == "unet"  # UNet pipelines run both predictions as one batch of 2
    asked = replace(size, prompt_tokens=tokens[encoders[-1]] if encoders else None, batch=2 if batched else 1,
                    vae_scale=spatial, vae_scale_temporal=temporal)
    try:
        examples = {e: derive(planned[e], ExampleSize(prompt_tokens=tokens[e])).example for e in encoders}
        denoised = derive(denoiser, asked)
        examples[denoiser_name] = denoised.example
        if vae is not None:
            examples["vae"] = vae_decode_example(vae, denoised.size, video=denoised.size.frames is not None).example
    except ResidencyError as e:
        # a size (UsageError) or a config field (ConfigFieldError) the user can fix here: its own hint
        raise type(e)(f"{path}: {e.message}", hint=e.hint if isinstance(e, (UsageError, ConfigFieldError)) else
                      "plan the pipeline from Python: residency.attach(pipe, vram=…)") from e
    parts = []
    for comp, example in examples.items():
        traced = _traced(path, comp, ComponentCall(comp, planned[comp], methods[comp]), example, compute_dtype)
        # with guidance an encoder encodes the negative prompt too, and a transformer predicts twice a step
        calls = 2 if guided and comp != "vae" and not (comp == denoiser_name and batched) else 1
        parts.append(ComponentPart(comp, roles[comp], comp == denoiser_name, traced.workload, calls))
    steps = _call_default(pipe_class, "num_inference_steps")
    steps = steps if isinstance(steps, int) and steps > 0 else DEFAULT_STEPS
    guidance = ", classifier-free guidance" if guided else ""
    # DDPMPipeline runs 1000 steps by default: planned at the most a plan holds, and said (--steps sets fewer)
    capped = f"{MAX_STEPS} of its default {steps} steps, the most a plan holds" if steps > MAX_STEPS else ""
    if capped and not steps_given:  # in the workload's source alone, it was shown nowhere
        print(f"note: {path}: {capped}: planned at {MAX_STEPS} steps (--steps N for another count)", file=sys.stderr)
    return join_phases(f"{path.name} at {denoised.label}", parts, min(steps, MAX_STEPS),
                       source=f"{pipe_name} directory (configs only{guidance}{'; ' if capped else ''}{capped}): "
                              + ", ".join(p.component for p in parts),
                       video_frames=denoised.size.frames or 1)  # --fps then counts a video's frames
