"""What residency hangs on an attached model (hooks, guards) refuses deepcopy and pickling, with what to do."""

from __future__ import annotations

from typing import Any

from residency.errors import ResidencyError


class NotPickled:
    """What residency hangs on an attached model refuses pickling (torch.save(model)) with what to do: pickled,
    a block's tensors would be saved with a slot's bytes, and a local hook failed with an AttributeError."""

    def __deepcopy__(self, memo: dict) -> Any:
        """copy.deepcopy of a hooked model reaches its hooks: refuse it here, clearly. While attached, block
        weights live in the runtime's memory (a streamed block's tensors are empty between calls), so a copy
        would hold other bytes, and a copy's hooks would drive the original's runtime."""
        raise ResidencyError("copy.deepcopy of a model attached to residency: its blocks' weights live in the "
                             "runtime's memory while attached, not in the model",
                             hint="copy it before attaching or after runtime.detach() (leaving the `with` block); "
                                  "model.state_dict() gives the original weights while attached")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise ResidencyError("pickling a model attached to residency (torch.save(model), copy.copy): its blocks' "
                             "weights live in the runtime's memory while attached",
                             hint="save model.state_dict() (the original weights, while attached too), or "
                                  "detach() first")
