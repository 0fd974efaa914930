"""A check the meta device does not make: an integer tensor fed to a float layer.

On meta, `F.linear(ids, weight)` with int64 ids and a float32 weight returns an int64 result; the model run for real
refuses it ("mat1 and mat2 must have the same dtype"). Left to the meta count, attach planned and attached such an
example and the user's first call failed with torch's words. Checked only on torch's own layer classes (a quantized
subclass, bitsandbytes' Linear4bit, takes other dtypes by design), whose forward would run the weight on the input.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from residency.errors import PlanWarning, ResidencyError

_FLOAT_LAYERS = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d)


class IntegerInputError(ResidencyError):
    """An example input reaches a float layer as integers: the model itself would refuse the call."""


@contextmanager
def float_layers_refuse_integers(model: nn.Module, name: str, floats: bool = False) -> Iterator[None]:
    """While the body runs (the count of `model`'s forward), a call of one of `model`'s own nn.Linear/ConvNd layers
    with an integer first input raises IntegerInputError naming the layer. Cost: one pre-hook call per module call.

    floats: also say (a PlanWarning, once per layer) where a float input of another dtype than the layer's weight
    reaches it (float16 into float32) outside autocast, and count the call as if cast: the model refuses that call
    unless the user runs it under torch.autocast, which attach cannot see (a refusal broke autocast users). Only
    where the meta run holds the inputs in their own dtypes (a model held in the compute dtype): where it holds
    them in the compute dtype, a model's own cast (`x.to(w.dtype)`) is the same tensor there as no cast at all."""
    paths = {id(m): p for p, m in model.named_modules() if type(m) in _FLOAT_LAYERS}
    warned: set[str] = set()

    def check(module: nn.Module, args: tuple) -> tuple | None:
        path = paths.get(id(module))
        if path is None or not args or not isinstance(args[0], torch.Tensor):
            return None
        x, w = args[0], module.weight
        if not (x.is_floating_point() or x.is_complex()) and w.is_floating_point():
            raise IntegerInputError(
                f"{name}: {path or 'the model'} ({type(module).__name__}) gets its input as {x.dtype}, its weight "
                f"is {w.dtype}: the model itself refuses that call (torch: mat1 and mat2 must have the same dtype)",
                hint="give example_inputs= as the model takes them: float tensors where its layers compute on them "
                     "(token ids only where an embedding reads them)")
        if not (floats and x.is_floating_point() and w.is_floating_point() and x.dtype != w.dtype
                and not any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))):
            return None
        if path not in warned:
            warned.add(path)
            warnings.warn(f"{name}: {path or 'the model'} ({type(module).__name__}) gets its input as {x.dtype}, its "
                          f"weight is {w.dtype}: outside torch.autocast the model refuses that call (mat1 and mat2 "
                          f"must have the same dtype); planned as if the input were cast. Give example_inputs= in "
                          f"{w.dtype}, or call the model under torch.autocast", PlanWarning, stacklevel=2)
        # every float input (nn.Bilinear takes two): casting the first alone failed the second as "did not run"
        return tuple(a.to(w.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    handle = nn.modules.module.register_module_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()
