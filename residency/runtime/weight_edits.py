"""In-place edits of an attached model's weights, refused at its next call instead of half seen.

While attached, a block computes from the runtime's memory: a resident block's parameters point into it, so an
in-place edit (an init, a LoRA merge, `weight.mul_(0)`) changed the next calls; a streamed block's point into a
slot the copy engine refills, so the edit was seen by one call or none, as the race went; detach undid both.
"""

from __future__ import annotations

import torch

from residency.errors import ResidencyError
from residency.runtime.executor import version_of
from residency.workload import Workload


class WeightWatch:
    """The version counters of every block parameter at attach (buffers are states a block may update: the
    executor keeps those). torch bumps a tensor's counter on each in-place op on it, and neither `.data`
    swaps nor writes into the memory it is bound to touch it, so a change is the user's edit.

    Cost: one counter read per parameter (~0.1 µs) per top-level call or step, never per block call."""

    def __init__(self, workload: Workload, tensors: dict[str, tuple[torch.Tensor, ...]],
                 buffer_index: dict[str, tuple[int, ...]]):
        self.watched: list[tuple[str, str, torch.Tensor, int]] = []
        for name, ts in tensors.items():
            names = [n for n, _ in workload.by_name[name].tensors]
            buffers = set(buffer_index.get(name, ()))
            self.watched += [(name, names[i], t, version_of(t)) for i, t in enumerate(ts) if i not in buffers]

    def check(self) -> None:
        """Raise ResidencyError naming the first parameter edited in place since attach."""
        for block, tensor, t, version in self.watched:
            if version >= 0 and t._version != version:
                raise ResidencyError(
                    f"{block}: {tensor} was changed in place while attached; the runtime computes from its own "
                    "copy of the weights, so the edit would be seen by some calls and not others, and detach "
                    "restores the weights as they were at attach",
                    hint="edit weights (an init, a LoRA merge, load_state_dict) before attaching or after "
                         "runtime.detach(), then attach again")
