"""A counted forward where the meta device fails (a data-dependent `.item()`): one forward of the model itself
on its weights, or of a narrow instance of it (fewer channels) for a model that has none, widened back."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from residency.errors import ResidencyError
from residency.workload.example_inputs import Example, split_example
from residency.workload.module_blocks import ModuleBlocks, find_blocks
from residency.workload.module_trace import Trace, trace_forward
from residency.workload.op_count import size_class


def _has_weights(model: nn.Module) -> bool:
    return not any(t.is_meta for t in chain(model.parameters(), model.buffers()))


def _real_inputs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Meta example tensors as zeros where the model lives (zeros are valid token ids and timesteps), the others
    copied: a forward that edits its input in place (x.mul_(2)) edited the caller's example, so the first real
    call after attach saw another input (cost: one copy of the example)."""
    ref = next(chain(model.parameters(), model.buffers()))
    copies: dict[int, torch.Tensor] = {}  # one copy per tensor: model(x, x) still gets one tensor twice (q is k)

    def real(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_meta:
            return torch.zeros(t.shape, dtype=ref.dtype if t.is_floating_point() else t.dtype, device=ref.device)
        if isinstance(t, torch.Tensor):
            if id(t) not in copies:
                copies[id(t)] = t.clone()
            return copies[id(t)]
        return t

    return tree_map(real, (args, kwargs))


def fallback_trace(model: nn.Module, blocks: ModuleBlocks, args: tuple, kwargs: dict[str, Any], batch: int,
                    narrow: Callable[[], tuple[nn.Module, Example]] | None, name: str,
                    meta_error: str) -> tuple[Trace, str]:
    """The trace of one real forward of `model` ("real"), or of `narrow()`'s instance widened to `model`'s shapes
    ("narrow"); ResidencyError naming `meta_error` when the model has no weights and no narrow factory."""
    units = [u.modules for u in blocks.units]
    if _has_weights(model):
        rargs, rkwargs = _real_inputs(model, args, kwargs)
        weights = list(chain(model.named_parameters(), model.named_buffers()))
        # one real forward at the example's shape: its cost is the model's own (seconds for a large model). A
        # forward that updates its buffers (a cache, a position counter) must leave no trace: attach alone
        # would have changed the model. Buffers are small; parameters are not written by a forward.
        held = [(b, b.clone()) for _, b in model.named_buffers() if b is not None]
        try:
            return trace_forward(model, units, lambda: model(*rargs, **rkwargs), weights, batch), "real"
        finally:
            with torch.no_grad():
                for b, saved in held:
                    b.copy_(saved)
    if narrow is None:
        raise ResidencyError(f"{name}: counting on the meta device failed ({meta_error}) and the model has no "
                             "weights to run", hint="pass narrow=, a factory of the same model with fewer "
                             "channels and its example inputs, or load the weights")
    small, example = narrow()
    if [u.modules for u in find_blocks(small).units] != units:
        raise ResidencyError(f"{name}: the narrow instance has other blocks than the model",
                             hint="build it from the same config with only its widths reduced")
    nargs, nkwargs = split_example(example)
    weights = list(chain(small.named_parameters(), small.named_buffers()))
    widen = _dim_map(dict(weights), dict(chain(model.named_parameters(), model.named_buffers())))
    trace = trace_forward(small, units, lambda: small(*nargs, **nkwargs), weights, batch, widen)
    _widen_elements(trace)
    return trace, "narrow"


def _dim_map(small: Mapping[str, torch.Tensor], wide: Mapping[str, torch.Tensor]) -> Callable[[tuple], tuple]:
    """narrow shape -> wide shape, each dimension mapped as the weights map it: a 32 that is 256 wherever a
    weight has it becomes 256, a token count no weight has stays. Exact when every narrowed width shows
    in some weight's shape and no token count equals a narrowed width; a head count or head width that
    no weight shows (heads narrowed, then split from a projection) is not widened."""
    votes: dict[int, dict[int, int]] = {}
    for name, t in small.items():
        w = wide.get(name)
        if w is not None and w.dim() == t.dim():
            for n, m in zip(t.shape, w.shape, strict=True):
                votes.setdefault(n, {}).setdefault(m, 0)
                votes[n][m] += 1
    to = {n: max(c, key=c.get) for n, c in votes.items()}
    return lambda shape: tuple(to.get(d, d) for d in shape)


def _widen_elements(trace: Trace) -> None:
    """The op counter's elements, counted at the narrow shapes, scaled by how much larger the activations
    each unit made are at the wide shapes; their size classes move up as much (an estimate: a class holds
    ops whose largest tensor is within 4× of each other)."""
    for counts in chain(trace.units, trace.glue.values()):
        r = counts.made_wide / counts.made_elements if counts.made_elements else 1.0
        widened: dict[int, int] = {}
        for c, n in counts.by_size.items():
            k = size_class(round(c * r / 2))  # from the middle of the class: r = 1 keeps it
            widened[k] = widened.get(k, 0) + round(n * r)
        counts.by_size = widened
        counts.elements = sum(widened.values())
