"""Example inputs a known model class implies from its config, for the workload's one counted forward.

Only where the config fixes every shape: a transformers model reading token ids (a batch of one prompt of
EXAMPLE_TOKENS tokens) and a diffusers UNet2DConditionModel without extra conditioning (one latent of its
configured sample size, EXAMPLE_TOKENS text tokens). Anything else needs the caller's example_inputs.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from residency.errors import ResidencyError

EXAMPLE_TOKENS = 16  # prompt tokens of a derived example; a call with another length is refused


def is_instance_of(obj: object, module: str, cls: str) -> bool:
    """isinstance against a library class, without importing the library (seconds) when it is not loaded."""
    lib = sys.modules.get(module)
    return lib is not None and isinstance(obj, getattr(lib, cls, ()))


def derived_example(model: nn.Module) -> dict[str, Any]:
    """The example inputs `model`'s config implies; a ResidencyError saying what to pass where none does."""
    if is_instance_of(model, "transformers", "PreTrainedModel"):
        return _transformers_example(model)
    if is_instance_of(model, "diffusers", "UNet2DConditionModel"):
        return _unet_example(model)
    raise ResidencyError(
        f"{type(model).__name__}: residency cannot tell the shapes of its inputs from the model alone",
        hint="pass example_inputs=, the inputs of one call at the shapes you will run (a tensor, a tuple of "
             "positional inputs or a dict of keyword inputs), e.g. residency.attach(model, vram=…, "
             "example_inputs=dict(hidden_states=x, timestep=t, …))")


def _transformers_example(model: nn.Module) -> dict[str, Any]:
    main = getattr(model, "main_input_name", "input_ids")
    if main != "input_ids":
        raise ResidencyError(f"{type(model).__name__} reads {main!r}, not token ids: its input shapes are not "
                             "in its config", hint=f"pass example_inputs=dict({main}=…) at the shape you will run")
    ids = torch.zeros(1, EXAMPLE_TOKENS, dtype=torch.long)  # token 0 exists in every vocabulary
    example: dict[str, Any] = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        example["decoder_input_ids"] = ids.clone()
    return example


def _unet_example(model: nn.Module) -> dict[str, Any]:
    c = model.config
    extra = [k for k in ("addition_embed_type", "class_embed_type") if c.get(k) is not None]
    size = c.get("sample_size")
    if extra or not isinstance(size, int) or not isinstance(c.get("cross_attention_dim"), int):
        why = f"its config sets {', '.join(extra)}" if extra else "its config has no single sample_size / width"
        raise ResidencyError(f"UNet2DConditionModel: {why}; residency cannot build its example inputs",
                             hint="pass example_inputs=dict(sample=…, timestep=…, encoder_hidden_states=…, …)")
    dtype = next(model.parameters()).dtype
    return {"sample": torch.zeros(1, c.in_channels, size, size, dtype=dtype),
            "timestep": torch.ones(1, dtype=dtype),
            "encoder_hidden_states": torch.zeros(1, EXAMPLE_TOKENS, c.cross_attention_dim, dtype=dtype),
            "return_dict": False}
