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
    """The version counters and storages of every block parameter at attach and after each call (buffers are
    states a block may update: the executor keeps those), and the version counters of their original data (what
    state_dict() returns while attached). torch bumps a tensor's counter on each in-place op on it, and neither
    the runtime's `.data` swaps nor its writes into the memory a parameter is bound to touch it, so a change
    between calls is the user's edit (one inside a call, nn.Embedding(max_norm=…)'s renorm, is the model's own);
    a parameter's storage other than the view the runtime last bound it to is the user's `weight.data = …`.
    Not seen: an in-place op through `.data` (`w.data.mul_(0)`: a fresh version counter on the same storage,
    which only reading every value would tell).

    Cost: four reads per parameter (~0.1 µs each) per top-level call or step, never per block call."""

    def __init__(self, workload: Workload, tensors: dict[str, tuple[torch.Tensor, ...]],
                 buffer_index: dict[str, tuple[int, ...]],
                 originals: dict[str, tuple[torch.Tensor, ...]] | None = None,
                 bound_views: dict[str, tuple[torch.Tensor, ...]] | None = None):
        # bound_views: the executor's views per block (Executor.views), read at each check, never copied
        self.bound_views = bound_views if bound_views is not None else {}
        self.watched: list[tuple[str, str, torch.Tensor, torch.Tensor | None, int]] = []
        for name, ts in tensors.items():
            names = [n for n, _ in workload.by_name[name].tensors]
            buffers = set(buffer_index.get(name, ()))
            homes = (originals or {}).get(name)
            self.watched += [(name, names[i], t, homes[i] if homes is not None else None, i)
                             for i, t in enumerate(ts) if i not in buffers]
        self.versions = [version_of(t) for _, _, t, _, _ in self.watched]
        self.home_versions = [version_of(h) if h is not None else -1 for _, _, _, h, _ in self.watched]

    def rebase(self) -> None:
        """Take the counters as they are now (after a call: the model's own in-place ops are its business)."""
        versions = self.versions
        for i, (_, _, t, _, _) in enumerate(self.watched):
            versions[i] = version_of(t)

    def check(self) -> None:
        """Raise ResidencyError naming the first parameter edited in place, replaced (`.data = …`) or written
        through state_dict() since the last call (or attach)."""
        views = self.bound_views
        for i, (block, tensor, t, home, at) in enumerate(self.watched):
            version = self.versions[i]
            bound = views.get(block)
            if version >= 0 and t._version != version:
                how = "was changed in place"
            elif bound is not None and t.data_ptr() != bound[at].data_ptr():
                how = "was replaced (weight.data = …)"
            elif home is not None and self.home_versions[i] >= 0 and home._version != self.home_versions[i]:
                raise ResidencyError(
                    f"{block}: {tensor} was written through the tensor state_dict() returned while attached; "
                    "the runtime computes from its own copy of the weights, so no call would see the edit "
                    "until detach, which keeps it",
                    hint="edit weights (an EMA update, a loader's copy_) before attaching or after "
                         "runtime.detach(), then attach again")
            else:
                continue
            raise ResidencyError(
                f"{block}: {tensor} {how} while attached; the runtime computes from its own copy of the "
                "weights, so the edit would be seen by some calls and not others, and detach restores the "
                "weights as they were at attach",
                hint="edit weights (an init, a LoRA merge, load_state_dict) before attaching or after "
                     "runtime.detach(), then attach again")
