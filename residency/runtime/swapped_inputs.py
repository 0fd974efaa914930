"""A model call given one of the model's own swapped weights as an input is refused before it runs.

A weight of a block the plan streams (or keeps for one phase, or packed) has its .data pointed at a slot the ring
refills: read outside its block's call, it holds whatever block was copied there last. Passed in as an argument
(`model(x, model.layers[0].fc.weight)`, a tied matrix handed to a head) it gave outputs off by 5 with no error.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils._pytree import tree_flatten

from residency.errors import ResidencyError
from residency.workload import Workload


class SwappedInputs:
    """The call check: the swapped weights by identity (a view of one counts, through its ._base).
    Cost per model call: one walk over the call's inputs (~µs); nothing when the plan swaps no weight."""

    def __init__(self, workload: Workload, tensors: Mapping[str, tuple[torch.Tensor, ...]],
                 volatile: set[str], buffer_index: Mapping[str, tuple[int, ...]]):
        self.names: dict[int, str] = {}
        for block in volatile:
            kept = set(buffer_index.get(block, ()))  # buffers keep their own storage between calls
            for i, (t, (name, *_)) in enumerate(zip(tensors[block], workload.by_name[block].tensors, strict=True)):
                if i not in kept:
                    self.names[id(t)] = f"{block}.{name}" if name else block

    def __call__(self, args: tuple, kwargs: dict) -> None:
        if not self.names:
            return
        for t in tree_flatten((args, kwargs))[0]:
            if not isinstance(t, torch.Tensor):
                continue
            name = self.names.get(id(t)) or (self.names.get(id(t._base)) if t._base is not None else None)
            if name is not None:
                raise ResidencyError(
                    f"the call was given the model's own weight {name} as an input: the plan swaps that block's "
                    "weights through device memory the next blocks reuse, so outside its block's call it holds "
                    "another block's values",
                    hint="pass a copy taken before attaching (w.detach().clone()), read it inside the block's "
                         "forward, or keep that block resident (plan it with more vram=)")

