"""A plan is made for the example's input shapes: a call with other shapes is refused before it runs.

Its activations, scratch and per-call cost were sized for those shapes; a larger input would overrun the
budget the ledger holds, a smaller one run under a plan chosen for other trade-offs.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from residency.errors import ResidencyError

Signature = tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]  # (input name, shapes of its tensors), sorted


def input_names(model: nn.Module) -> tuple[str, ...]:
    """The forward's positional parameter names, so that `model(x)` and `model(input_ids=x)` compare equal."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a C-implemented or oddly wrapped forward: positions stay arg0, arg1, …
        return ()
    names = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return tuple(names)


def signature(names: tuple[str, ...], args: tuple, kwargs: Mapping[str, Any]) -> Signature:
    """The shapes of every tensor of a call, by input name; values that are not tensors do not count."""
    named = {(names[i] if i < len(names) else f"arg{i}"): a for i, a in enumerate(args)}
    named.update(kwargs)
    out = []
    for key, value in named.items():
        shapes = tuple(tuple(t.shape) for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))
        if shapes:
            out.append((key, shapes))
    return tuple(sorted(out))


@dataclass(frozen=True)
class ShapeGuard:
    """The runtime's call_check: refuses a call whose tensors differ in shape from the example's.

    Cost: one walk over the call's inputs per model call, ~27 µs for Flux's seven (measured on this CPU)."""

    model_label: str
    names: tuple[str, ...]
    planned: Signature

    @classmethod
    def for_example(cls, model: nn.Module, label: str, args: tuple, kwargs: Mapping[str, Any]) -> ShapeGuard:
        names = input_names(model)
        return cls(label, names, signature(names, args, kwargs))

    def __call__(self, args: tuple, kwargs: dict) -> None:
        got = signature(self.names, args, kwargs)
        if got != self.planned:
            raise ResidencyError(
                f"{self.model_label} was called with inputs {_show(got)}; the plan was made for "
                f"{_show(self.planned)} (its example inputs) and is not run for other shapes",
                hint="leave this runtime (or detach() it) and attach again with example_inputs= at the new "
                     "shapes: residency.attach(model, vram=…, example_inputs=<the inputs of this call>)")


def _show(sig: Signature) -> str:
    if not sig:
        return "(no tensors)"
    return ", ".join(f"{k}=" + "/".join("×".join(map(str, s)) or "scalar" for s in shapes) for k, shapes in sig)
