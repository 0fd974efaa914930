"""`residency.detach(model)`: let go of whatever runtime `residency.attach` put on a model or pipeline, for a
caller that did not keep the runtime attach returned (accelerate's style: `attach(model, …)` on a line alone)."""

from __future__ import annotations

from typing import Any

from torch import nn

from residency.errors import ResidencyError
from residency.front_door.offload_guards import OffloadGuards
from residency.runtime.hooks import _ATTR
from residency.runtime.recovering import RetryHook


def _model_runtime(module: nn.Module):
    """The Runtime whose model `module` is (it carries that runtime's retry hook), else None."""
    hook = getattr(module, _ATTR, (None,))[0]
    return hook.runtime if isinstance(hook, RetryHook) else None


def _pipeline_guards(pipe: Any) -> OffloadGuards | None:
    """The guards an attached pipeline carries (they hold its runtime), else None."""
    for value in vars(pipe).values():
        owner = getattr(getattr(value, "func", None), "__self__", None)
        if isinstance(owner, OffloadGuards):
            return owner
    return None


def detach(target: Any) -> None:
    """Detach the runtime `residency.attach(target, …)` attached, restoring the model (or pipeline) exactly, as
    that runtime's detach() does. Raises ResidencyError when `target` is not attached, or is part of a model
    attached whole (naming it)."""
    guards = _pipeline_guards(target) if not isinstance(target, nn.Module) and hasattr(target, "__dict__") else None
    if guards is not None:
        guards.runtime.detach()
        guards.remove()
        return
    if isinstance(target, nn.Module):
        runtime = _model_runtime(target)
        if runtime is not None:
            runtime.detach()
            return
        if hasattr(target, _ATTR):
            raise ResidencyError(f"{type(target).__name__} is one block of a model attached whole, not the model",
                                 hint="residency.detach(the model you gave residency.attach), or that runtime's "
                                      "detach()")
        inner = [(n, rt) for n, m in target.named_modules() if n and (rt := _model_runtime(m)) is not None]
        if inner:
            for _, rt in inner:  # components attached one by one (attach(pipe.unet, …)): each let go
                rt.detach()
            return
    components = getattr(target, "components", None)
    if isinstance(components, dict):  # a pipeline whose components were attached one by one
        attached = [m for m in components.values() if isinstance(m, nn.Module) and _model_runtime(m) is not None]
        for m in attached:
            _model_runtime(m).detach()
        if attached:
            return
    raise ResidencyError(f"{type(target).__name__} is not attached to a runtime",
                         hint="residency.detach takes the model or pipeline given to residency.attach")
