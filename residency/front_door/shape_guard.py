"""A plan is made for the example's input shapes: a call with larger inputs is refused before it runs.

Its activations, scratch and per-call cost were sized for those shapes; a larger input would overrun the
budget the ledger holds. A call no larger than the example runs under it (a generate() loop: the prompt, then
one token a step, with the extra inputs it adds — positions, a mask, an encoder's outputs — no longer in any
dimension but their width than the example's longest); the prediction is then the example's, an upper bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from residency.errors import ResidencyError
from residency.runtime.retry_safety import input_names

Signature = tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]  # (input name, shapes of its tensors), sorted


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
    """The runtime's call_check: refuses a call with a tensor larger than the example's.

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
        if got == self.planned:
            return
        why = _mismatch(got, self.planned)
        if why is None:
            return
        raise ResidencyError(
            f"{self.model_label} was called with inputs {_show(got)}; the plan was made for "
            f"{_show(self.planned)} (its example inputs): {why}. It runs calls of the example's structure "
            "(the same number of tensors per input, no more dimensions), none larger",
            hint="leave this runtime (or detach() it) and attach again with example_inputs= at the largest "
                 "shapes you will call it with: residency.attach(model, vram=…, example_inputs=<those inputs>)")


def _mismatch(got: Signature, planned: Signature) -> str | None:
    """Why the call is not one the plan runs (None: it is). Every tensor of an input the example has must be no
    larger in any dimension (same count, no more dimensions; fewer are aligned to the example's last ones). An input it lacks (an encoder-decoder's generate() passes
    encoder_outputs, batch × source tokens × width) must have every dimension but its last (the width, which the
    model fixes) no larger than the example's largest dimension."""
    plan = dict(planned)
    largest = max((d for shapes in plan.values() for s in shapes for d in s), default=0)
    for name, shapes in got:
        mine = plan.get(name)
        if mine is None:
            if any(d > largest for s in shapes for d in s[:-1]):
                return f"{name} is no input of the example's, and larger than any of them"
            continue
        if len(shapes) != len(mine):
            return f"{name} holds {len(shapes)} tensor(s) where the example's holds {len(mine)}"
        for s, m in zip(shapes, mine, strict=True):
            if len(s) > len(m):
                return f"{name} has {len(s)} dimension(s) where the example's has {len(m)}"
            # fewer dimensions, as broadcasting aligns them (a 0-d timestep where the example's is one per
            # sample, an unbatched input): no larger than the example's trailing ones
            skip = len(m) - len(s)
            for i, (a, b) in enumerate(zip(s, m[skip:], strict=True)):
                if a > b and not (i == len(s) - 1 and _grows_with_the_cache(name)):
                    return f"{name} is larger than the example's ({a} against {b} in dimension {i + skip})"
    return None


def _grows_with_the_cache(name: str) -> bool:
    """An attention mask (attention_mask, decoder_attention_mask, …): its last dimension spans the cache and the new
    tokens, so a generate() step past the example's length lengthens it while the call's tokens stay one. Checked
    on its other dimensions only, as the cache it grows with is not checked: a padded prompt's mask was refused at
    the second step (an all-ones one, which transformers drops, ran)."""
    return name.endswith("attention_mask")


def _show(sig: Signature) -> str:
    if not sig:
        return "(no tensors)"
    return ", ".join(f"{k}=" + "/".join("×".join(map(str, s)) or "scalar" for s in shapes) for k, shapes in sig)
