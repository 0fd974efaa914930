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


class _InstanceRefusal(NotPickled):
    """An instance-level `__deepcopy__` or `__reduce_ex__` on the attached model itself: copy.copy copies the
    instance's attributes without reducing them, so a shallow copy kept the original's forward wrapper and hook,
    drove the original's runtime and could never be attached itself."""

    def __init__(self, deep: bool):
        self.deep = deep

    def __call__(self, arg: Any) -> Any:
        if self.deep:
            return NotPickled.__deepcopy__(self, arg)
        return NotPickled.__reduce_ex__(self, arg)


def refuse_copies(model: Any) -> None:
    """copy.copy, copy.deepcopy and pickling of `model` refused while attached (copy and pickle look these up on
    the instance)."""
    model.__dict__["__deepcopy__"] = _InstanceRefusal(deep=True)
    model.__dict__["__reduce_ex__"] = _InstanceRefusal(deep=False)


def allow_copies(model: Any) -> None:
    """Undo refuse_copies."""
    for name in ("__deepcopy__", "__reduce_ex__"):
        if isinstance(model.__dict__.get(name), _InstanceRefusal):
            del model.__dict__[name]


class NotCopiedRuntime:
    """A runtime (threads, device memory, the attached model's hooks) refuses copy and pickling by name: they
    failed deep inside with "cannot pickle '_thread.lock' object"."""

    def __deepcopy__(self, memo: dict) -> Any:
        raise ResidencyError(f"copy.deepcopy of a {type(self).__name__}: it holds threads, device memory and the "
                             "attached model, which a copy cannot share or duplicate", hint=_RUNTIME_HINT)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise ResidencyError(f"pickling (or copying) a {type(self).__name__}: it holds threads, device memory and "
                             "the attached model", hint=_RUNTIME_HINT)


_RUNTIME_HINT = ("keep its plan instead — residency.save_plan(rt.plan, path) — and attach again with plan=path; "
                 "attach a copy of the model for a second runtime")
