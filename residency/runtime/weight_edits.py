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
    """The version counters of every block parameter at attach and after each call (buffers are states a block
    may update: the executor keeps those). torch bumps a tensor's counter on each in-place op on it, and neither
    `.data` swaps nor writes into the memory it is bound to touch it, so a change between calls is the user's
    edit (one inside a call, nn.Embedding(max_norm=…)'s renorm, is the model's own).

    Cost: two counter reads per parameter (~0.1 µs each) per top-level call or step, never per block call."""

    def __init__(self, workload: Workload, tensors: dict[str, tuple[torch.Tensor, ...]],
                 buffer_index: dict[str, tuple[int, ...]]):
        self.watched: list[tuple[str, str, torch.Tensor]] = []
        for name, ts in tensors.items():
            names = [n for n, _ in workload.by_name[name].tensors]
            buffers = set(buffer_index.get(name, ()))
            self.watched += [(name, names[i], t) for i, t in enumerate(ts) if i not in buffers]
        self.versions = [version_of(t) for _, _, t in self.watched]

    def rebase(self) -> None:
        """Take the counters as they are now (after a call: the model's own in-place ops are its business)."""
        versions = self.versions
        for i, (_, _, t) in enumerate(self.watched):
            versions[i] = version_of(t)

    def check(self) -> None:
        """Raise ResidencyError naming the first parameter edited in place since the last call (or attach)."""
        for (block, tensor, t), version in zip(self.watched, self.versions, strict=True):
            if version >= 0 and t._version != version:
                raise ResidencyError(
                    f"{block}: {tensor} was changed in place while attached; the runtime computes from its own "
                    "copy of the weights, so the edit would be seen by some calls and not others, and detach "
                    "restores the weights as they were at attach",
                    hint="edit weights (an init, a LoRA merge, load_state_dict) before attaching or after "
                         "runtime.detach(), then attach again")
