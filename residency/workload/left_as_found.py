"""Run the user's code once for counting and leave no trace of it: attach alone must not change a model.

A counted forward (on the meta device, or the model's own where meta fails) runs the model's Python: a block
may cache a tensor it derives on its first call (`self._w = self.lin.weight.t()`), bump a step counter, keep a
state tensor, or draw random numbers. Left as they were after the count, a cached meta tensor made every later
call NaN or a device error, and a seed set before attach no longer gave the unattached model's output.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

# a module's own registries: functional_call and the caller put their contents back themselves
_REGISTRIES = frozenset({"_parameters", "_buffers", "_modules"})


def generators_in(values: Any) -> list[torch.Generator]:
    """Every torch.Generator among `values` (any nesting of tuples, lists and dicts)."""
    leaves, _ = tree_flatten(values)
    return [v for v in leaves if isinstance(v, torch.Generator)]


@contextmanager
def left_as_found(modules: Iterable[nn.Module], generators: Iterable[torch.Generator] = ()) -> Iterator[None]:
    """On exit, each of `modules`' trees has the attributes it had on entry (one added is deleted, one rebound
    is bound back), every plain tensor attribute its values, and torch's global RNG (CPU, and CUDA where it is
    initialised) and each of `generators` its state.

    Hazard: a mutable container an attribute holds (a list of cached tensors) is the same object, and its
    contents are not put back. Cost: one walk over the modules and a copy of each plain tensor attribute
    (none on most models: their tensors are parameters and buffers)."""
    saved = []
    for module in {id(m): m for top in modules for m in top.modules()}.values():
        attrs = {k: v for k, v in vars(module).items() if k not in _REGISTRIES}
        values = {k: v.clone() for k, v in attrs.items()
                  if isinstance(v, torch.Tensor) and not v.is_meta and not isinstance(v, nn.Parameter)}
        saved.append((module, attrs, values))
    gens = [(g, g.get_state()) for g in {id(g): g for g in generators}.values()]
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for module, attrs, values in saved:
            current = vars(module)
            for key in [k for k in current if k not in attrs and k not in _REGISTRIES]:
                del current[key]
            for key, value in attrs.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value
            with torch.no_grad():
                for key, value in values.items():
                    kept = attrs[key]
                    # written only where it changed: a copy into a view of a parameter would bump its
                    # version counter, which the runtime reads as the user's edit
                    if kept.shape == value.shape and kept.dtype == value.dtype and not torch.equal(kept, value):
                        kept.copy_(value)
        for gen, state in gens:
            gen.set_state(state)
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


_MISSING = object()
