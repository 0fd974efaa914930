"""How a diffusers pipeline takes its call's shape arguments: the denoise steps it runs (timesteps= or sigmas= set them
outright) and a height or width left to its default."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

# Arguments that set the denoise schedule outright: given, the pipeline runs one step per entry and ignores
# num_inference_steps (diffusers' retrieve_timesteps)
SCHEDULE_ARGUMENTS = ("timesteps", "sigmas")


def schedule_given(call: Mapping[str, Any]) -> str | None:
    """The schedule argument the call gives (a non-empty sequence), else None."""
    for key in SCHEDULE_ARGUMENTS:
        value = call.get(key)
        if value is not None and hasattr(value, "__len__") and len(value) > 0:
            return key
    return None


def effective_size(pipe: Any, key: str, value: Any) -> Any:
    """A height or width as the pipeline takes it: None is its default, default_sample_size (else its denoiser's
    config.sample_size) × vae_scale_factor, as diffusers' text-to-image pipelines resolve it. Compared raw, a plan
    made at the default refused a call giving that same height ("made for height=None, this call asks height=32").
    Anything else, or a default the pipeline does not expose, as it is."""
    if value is not None or key not in ("height", "width"):
        return value
    size = getattr(pipe, "default_sample_size", None)
    if size is None:
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        size = getattr(getattr(denoiser, "config", None), "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if isinstance(size, (tuple, list)) and len(size) == 2:
        size = size[0] if key == "height" else size[1]
    if isinstance(size, int) and isinstance(scale, int):
        return size * scale
    return value


def steps_of(pipe: Any, call: Mapping[str, Any]) -> int:
    """The denoise steps the call asks: one per entry of its timesteps or sigmas when it gives them (a plan counted
    the signature's 50 for a call that ran 3: 43× the prediction), else its num_inference_steps, else the pipeline's
    default."""
    schedule = schedule_given(call)
    if schedule is not None:
        return len(call[schedule])
    return int(call.get("num_inference_steps", inspect.signature(pipe.__call__).parameters["num_inference_steps"].default))
