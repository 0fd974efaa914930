"""Run the user's code once for counting and leave no trace of it: attach alone must not change a model.

A counted forward (on the meta device, or the model's own where meta fails) runs the model's Python: a block
may cache a tensor it derives on its first call (`self._w = self.lin.weight.t()`), bump a step counter, keep a
state tensor, or draw random numbers. Left as they were after the count, a cached meta tensor made every later
call NaN or a device error, and a seed set before attach no longer gave the unattached model's output.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
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
    is bound back), no parameter, buffer, submodule or hook added since (each removed), every plain tensor attribute
    its values, and torch's global RNG (CPU, and CUDA where it is
    initialised) and each of `generators` its state.

    The lists, dicts and sets an attribute holds (a hand-written KV cache `self.kv = {}`, a history list), and
    those they hold, get their contents back too, and the plain tensors in them their values: left holding the
    count's meta tensors, the model's next call failed ("Tensor on device cpu is not on the expected device
    meta"), detached or not. Other objects' insides (a cache class) are not walked, nor containers of more than
    MAX_ITEMS items (tables, not caches). Cost: one walk over the
    modules, a shallow copy of each container, a copy of each plain tensor found (none on most models: their
    tensors are parameters and buffers)."""
    saved = []
    containers = _Containers()
    for module in {id(m): m for top in modules for m in top.modules()}.values():
        attrs = {k: v for k, v in vars(module).items() if k not in _REGISTRIES}
        values = {k: v.clone() for k, v in attrs.items() if _plain_tensor(v)}
        for k, v in attrs.items():
            if k not in _MODULE_OWN:
                containers.walk(v, 0)
        saved.append((module, attrs, values, _own_keys(module)))
    gens = [(g, g.get_state()) for g in {id(g): g for g in generators}.values()]
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    # a forward drawing from Python's or NumPy's global stream (a LayerDrop, a random crop) advanced it: a seeded run
    # then differed by whether it was attached
    py_rng, np_rng = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        for module, attrs, values, own in saved:
            _drop_added(module, own)
            current = vars(module)
            for key in [k for k in current if k not in attrs and k not in _REGISTRIES]:
                del current[key]
            for key, value in attrs.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value
            with torch.no_grad():
                for key, value in values.items():
                    _put_back(attrs[key], value)
        containers.restore()
        for gen, state in gens:
            gen.set_state(state)
        torch.random.set_rng_state(cpu_rng)
        random.setstate(py_rng)
        np.random.set_state(np_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


_MISSING = object()
# what every nn.Module holds of its own (hook tables, the non-persistent buffer set): torch's, not the model's
_MODULE_OWN = frozenset(vars(nn.Module()))
MAX_DEPTH = 4  # containers within containers walked, from an attribute
# Items of a container past which it is left as it is: a vocabulary or a lookup table, not a cache a forward fills
# (a 2 M-entry dict cost 2.1 s to copy per count, and attach counts up to 4 times)
MAX_ITEMS = 10_000


def _own_keys(module: nn.Module) -> dict[str, frozenset]:
    """The keys of a module's registries and hook tables (and the non-persistent buffer set's names)."""
    return {k: frozenset(v) for k, v in vars(module).items()
            if (k in _MODULE_OWN or k in _REGISTRIES) and isinstance(v, (dict, set))}


def _drop_added(module: nn.Module, own: dict[str, frozenset]) -> None:
    """Remove what the counted forward added to the module's registries and hook tables: a hook a forward installs
    once behind a flag (transformers' output capturing) ran twice ever after, the flag put back and its hook kept,
    and a buffer a block registers on its first call kept the count's update (a call counter one ahead)."""
    for key, before in own.items():
        table = vars(module).get(key)
        if not isinstance(table, (dict, set)):
            continue
        for added in [k for k in table if k not in before]:
            if isinstance(table, dict):
                table.pop(added)  # the table's own method: an OrderedDict keeps a linked list beside the dict
            else:
                table.discard(added)


def _plain_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and not v.is_meta and not isinstance(v, nn.Parameter)


def _put_back(kept: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a saved tensor's values back, only where they changed: a copy into a view of a parameter would bump its
    version counter, which the runtime reads as the user's edit."""
    if kept.shape == value.shape and kept.dtype == value.dtype and not torch.equal(kept, value):
        kept.copy_(value)


class _Containers:
    """The lists, dicts and sets reachable from attributes (through tuples too), each with a shallow copy of its
    contents, and the plain tensors among them with a copy of their values."""

    def __init__(self) -> None:
        self.saved: dict[int, tuple[Any, Any]] = {}
        self.tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def walk(self, v: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            return
        if _plain_tensor(v):
            if depth and id(v) not in self.tensors:
                self.tensors[id(v)] = (v, v.clone())
            return
        if isinstance(v, (list, dict, set)):
            if id(v) in self.saved or len(v) > MAX_ITEMS:
                return
            copy = list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else set(v)
            self.saved[id(v)] = (v, copy)
            items = v.values() if isinstance(v, dict) else v
        elif isinstance(v, tuple):
            items = v
        else:
            return
        for item in list(items):
            self.walk(item, depth + 1)

    def restore(self) -> None:
        # through the base types' methods: a subclass may refuse its own (diffusers' FrozenDict.update raises)
        for container, copy in self.saved.values():
            if isinstance(container, list):
                if len(container) != len(copy) or any(a is not b for a, b in zip(container, copy, strict=True)):
                    list.__setitem__(container, slice(None), copy)
            elif isinstance(container, dict):
                if dict.keys(container) != copy.keys() or any(dict.__getitem__(container, k) is not copy[k]
                                                             for k in copy):
                    dict.clear(container)
                    dict.update(container, copy)
            elif not set.__eq__(container, copy):
                set.clear(container)
                set.update(container, copy)
        with torch.no_grad():
            for kept, value in self.tensors.values():
                _put_back(kept, value)
