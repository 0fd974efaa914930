"""Refuse a model that accelerate or diffusers already offloads: two managers moving one weight corrupt it.

accelerate marks a hooked module with `_hf_hook` (add_hook_to_module: cpu_offload, dispatch_model,
`device_map=` loading, a pipeline's enable_model_cpu_offload / enable_sequential_cpu_offload); diffusers
keeps a `_diffusers_hook` registry on each module it hooks (apply_group_offloading, enable_group_offload,
layerwise casting, caches); a pipeline's enable_model_cpu_offload also leaves its hooks in `_all_hooks`.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from residency.errors import ResidencyError

ACCELERATE_ATTR = "_hf_hook"
DIFFUSERS_ATTR = "_diffusers_hook"


def refuse_foreign_hooks(model: nn.Module, label: str = "the model") -> None:
    """Raise a ResidencyError naming the first accelerate or diffusers hook found in `model`'s tree, the
    module path it sits on and how to remove it. Cost: one walk over the modules (~1 µs each)."""
    for path, module in model.named_modules():
        where = f"{label}.{path}" if path else label
        hook = getattr(module, ACCELERATE_ATTR, None)
        if hook is not None:
            mapped = " (loaded with device_map=…)" if getattr(model, "hf_device_map", None) else ""
            raise ResidencyError(
                f"{where} carries accelerate's {type(hook).__name__} (module attribute {ACCELERATE_ATTR}){mapped}: "
                "it already moves this model's weights, and residency would manage them a second time",
                hint="remove it first: accelerate.hooks.remove_hook_from_module(model, recurse=True) (a pipeline: "
                     "pipe.remove_all_hooks()), or load the model without device_map= / cpu_offload, on the CPU")
        names = list(_diffusers_hook_names(module))
        if names:
            raise ResidencyError(
                f"{where} carries diffusers hooks {', '.join(names)} (module attribute {DIFFUSERS_ATTR}): "
                "they already manage this model's weights or calls, and residency would do it a second time",
                hint="build or load the model again without enable_group_offload / apply_group_offloading "
                     "(or remove each with model._diffusers_hook.remove_hook(name, recurse=True))")


def refuse_pipeline_hooks(pipe: object, components: dict[str, nn.Module]) -> None:
    """A diffusers pipeline: its model-offload hooks, then every component module's tree."""
    if getattr(pipe, "_all_hooks", None):
        raise ResidencyError(
            f"the pipeline {type(pipe).__name__} carries {len(pipe._all_hooks)} offload hooks from "
            "enable_model_cpu_offload: they already move its components between devices",
            hint="call pipe.remove_all_hooks() first")
    for name, module in components.items():
        refuse_foreign_hooks(module, name)


def _diffusers_hook_names(module: nn.Module) -> Iterator[str]:
    registry = module.__dict__.get(DIFFUSERS_ATTR)
    hooks = getattr(registry, "hooks", None)
    if isinstance(hooks, dict):
        yield from hooks
