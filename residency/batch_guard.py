"""A pipeline call's batch against the plan's: each planned component's main input, checked on every call of it.

The planner sized activations and compute from the batch the planning call ran (a prompt, classifier-free
guidance doubling the denoiser's batch). A call with a list of prompts runs k times that through every block:
on a GPU, activations the ledger never counted (an OOM the re-plan cannot fix: it plans the same batch again),
and frames k times their prediction. The batch is the leading dimension of a call's first tensor argument of one
dimension or more (input ids, latents, hidden states); a smaller one than planned runs (it needs less).
Cost: one pass over a call's arguments per component call (a few µs; a few dozen calls per pipeline call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from residency.errors import ResidencyError

_MISSING = object()


def leading_dim(args: tuple, kwargs: Mapping[str, Any]) -> int | None:
    """The leading dimension of the first tensor of one dimension or more among the arguments, in call order."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


@dataclass(frozen=True)
class PlannedBatch:
    """What the planning call passed to one component: its method and the batch of its main input."""

    component: str
    method: str  # "forward", or "decode" for a VAE
    batch: int


def planned_batches(inputs: Mapping[str, tuple[tuple, dict, int]], methods: Mapping[str, str]) -> dict[str, PlannedBatch]:
    """From the captured first call of each component (args, kwargs, calls): those with a batch to check."""
    out = {}
    for name, (args, kwargs, _calls) in inputs.items():
        batch = leading_dim(args, kwargs)
        if batch is not None:
            out[name] = PlannedBatch(name, methods[name], batch)
    return out


# A pipeline call's arguments that set the batch, as an error names them (those the pipeline's call takes)
BATCH_ARGUMENTS = {"prompt": "a list of prompts", "class_labels": "a list of class_labels", "batch_size": "batch_size",
                   "num_images_per_prompt": "num_images_per_prompt",
                   "guidance_scale": "classifier-free guidance (guidance_scale)"}


def batch_arguments(parameters: Iterable[str]) -> tuple[str, ...]:
    """The BATCH_ARGUMENTS among a call's parameter names, in BATCH_ARGUMENTS' order."""
    names = set(parameters)
    return tuple(k for k in BATCH_ARGUMENTS if k in names)


def _guarded(inner: Callable[..., Any], planned: PlannedBatch, set_by: tuple[str, ...]) -> Callable[..., Any]:
    said = " or ".join(BATCH_ARGUMENTS[k] for k in set_by)
    example = {"prompt": "prompt=[…]", "class_labels": "class_labels=[…]",
               "batch_size": "batch_size=…"}.get(set_by[0] if set_by else "", "…")

    def call(*args: Any, **kwargs: Any) -> Any:
        got = leading_dim(args, kwargs)
        if got is not None and got > planned.batch:
            raise ResidencyError(
                f"the plan was made for a batch of {planned.batch} through {planned.component}; this call runs "
                f"{got}" + (f" ({said} sets it)" if said else ""),
                hint="attach again with the call as you will make it: residency.attach(pipe, "
                     f"example_inputs=dict({example}, …)) (attach_pipeline's call=)")
        return inner(*args, **kwargs)

    return call


@contextmanager
def batch_guard(modules: Mapping[str, nn.Module], planned: Mapping[str, PlannedBatch],
                set_by: tuple[str, ...] = ()) -> Iterator[None]:
    """Within the block, a call of a planned component with a larger batch than planned raises ResidencyError
    (before it runs), naming `set_by` (batch_arguments of the pipeline's call). Each method is wrapped through the
    module's instance dict and put back as it was, an instance attribute another wrapper had set included."""
    saved = []
    try:
        for name, p in planned.items():
            module = modules[name]
            saved.append((module, p.method, module.__dict__.get(p.method, _MISSING)))
            module.__dict__[p.method] = _guarded(getattr(module, p.method), p, set_by)
        yield
    finally:
        for module, method, before in reversed(saved):
            if before is _MISSING:
                module.__dict__.pop(method, None)
            else:
                module.__dict__[method] = before
