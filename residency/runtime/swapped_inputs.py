"""A model call given one of the model's own swapped weights as an input is refused before it runs.

A weight of a block the plan streams (or keeps for one phase, or packed and unpacked per call) has its .data pointed
at memory the runtime reuses: a ring slot, the phase arena, the unpack scratch. Read outside its block's call it holds
whatever was put there last. Passed in as an argument (`model(x, model.layers[0].fc.weight)`, or its .detach(), .data
or a view taken while attached) it gave outputs off by 5 with no error. Told apart by storage, not identity: a copy
or a view taken before attaching lives in the model's own storage and holds the right values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch.utils._pytree import tree_flatten

from residency.errors import ResidencyError
from residency.workload import Workload


class SwappedInputs:
    """The call check: the storages of the memory the runtime reuses between block calls, and the swapped weights (to
    name one in the message). Cost per model call: a storage lookup per input tensor (~µs); nothing when the plan
    reuses no memory."""

    def __init__(self, reused: Iterable[torch.Tensor | None], workload: Workload,
                 tensors: Mapping[str, tuple[torch.Tensor, ...]], volatile: set[str],
                 buffer_index: Mapping[str, tuple[int, ...]]):
        self.storages = frozenset(t.untyped_storage().data_ptr() for t in reused if t is not None and t.numel())
        self.weights: list[tuple[str, torch.Tensor]] = []
        for block in sorted(volatile):
            kept = set(buffer_index.get(block, ()))  # buffers keep their own storage between calls
            for i, (t, (name, *_)) in enumerate(zip(tensors[block], workload.by_name[block].tensors, strict=True)):
                if i not in kept:
                    self.weights.append((f"{block}.{name}" if name else block, t))

    def __call__(self, args: tuple, kwargs: dict) -> None:
        if not self.storages:
            return
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.storages:
                raise ResidencyError(
                    f"the call was given {self._named(t)} as an input: that memory holds the weights of whichever "
                    "block the runtime put there last (a ring slot, the phase arena or the unpack scratch), not its own",
                    hint="pass a copy taken before attaching (w.detach().clone()), read the weight inside its block's "
                         "forward, or keep that block resident (plan it with more vram=)")

    def _named(self, t: torch.Tensor) -> str:
        """The swapped weight `t` is (or is a view of), by storage; on the error path only."""
        for name, w in self.weights:  # the weight itself or a view of it: named for sure
            if w is t or t._base is w:
                return f"the model's own weight {name}"
        ptr = t.untyped_storage().data_ptr()
        for name, w in self.weights:  # .detach(), .data: the memory one is bound to (several share a slot)
            if w.untyped_storage().data_ptr() == ptr:
                return f"a tensor in the memory the model's weight {name} is bound to (its .detach() or .data?)"
        return "a tensor in the runtime's reused device memory (a view of a swapped block's weight)"
