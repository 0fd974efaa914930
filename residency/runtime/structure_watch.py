"""Modules and parameters added to an attached model: refused at its next call, warned about at detach.

Between its calls a streamed block's parameters point into a shared slot (another block's weights), so weights
built from them while attached (diffusers' `fuse_qkv_projections()` concatenating to_q/to_k/to_v into a new
to_qkv, an adapter merged into fresh layers) hold other blocks' values; and the new modules are in no block of
the plan: their weights sit wherever they were made, unplaced. Detach cannot repair values computed from the
slot, so the added weights are named at the next call and again at detach, instead of a silently wrong model.

torch calls its global registration hooks from Module.__setattr__ / register_module / register_parameter, so an
addition is seen when it happens, at no cost per model call. Registrations made while the model runs (a forward
that builds a submodule or a parameter lazily) are the model's own and not reported.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable

from torch import nn
from torch.nn.modules import module as torch_module

from residency.errors import ResidencyError, user_stacklevel

_LOCK = threading.Lock()
# Weak: a model attached and dropped without detach is collected with its runtime (a strong list kept both alive
# for the process's life); torch's hooks then stay installed with nothing to watch, at one set walk a registration.
_WATCHES: weakref.WeakSet[StructureWatch] = weakref.WeakSet()
_HANDLES: list = []  # torch's removable handles of the two global hooks, while any watch is open


LABEL_KEY = "_residency_label"  # a stand-in model's name for messages, in its __dict__ (private: a user's own
# attribute of a public name, a tensor, broke attach)


def model_label(model: nn.Module) -> str:
    """The name messages give the attached model: its class's, or what a stand-in says it is (a diffusers
    pipeline's components are attached under residency.attach_pipeline.PipelineModules, named after the pipeline)."""
    label = model.__dict__.get(LABEL_KEY)
    return label if isinstance(label, str) and label else type(model).__name__


def weak_call(owner: object, method: str) -> Callable[[], None]:
    """A call of `owner.<method>()` through a weak reference (nothing once the owner is gone)."""
    ref = weakref.ref(owner)

    def call() -> None:
        o = ref()
        if o is not None:
            getattr(o, method)()

    return call


def weak_busy(owner: object, attribute: str) -> Callable[[], bool]:
    """A busy() reading `owner.<attribute>` through a weak reference (False once the owner is gone)."""
    ref = weakref.ref(owner)

    def busy() -> bool:
        o = ref()
        return o is not None and bool(getattr(o, attribute))

    return busy


def _seen(module: nn.Module, name: str, kind: str, value: object, held: dict) -> None:
    if value is None or held.get(name) is value:  # a removal, or `m.weight = m.weight`: nothing added
        return
    with _LOCK:  # another thread may open or close a watch meanwhile: a WeakSet walked unlocked raised from setattr
        watches = list(_WATCHES)  # typically one or two attached models
    for watch in watches:
        watch.note(module, name, kind)


def _on_module(module: nn.Module, name: str, value: nn.Module | None) -> None:
    _seen(module, name, "submodule", value, module._modules)


def _on_parameter(module: nn.Module, name: str, value: nn.Parameter | None) -> None:
    _seen(module, name, "parameter", value, module._parameters)


class StructureWatch:
    """Watches one attached model's modules (weakly: a module the user drops is not kept alive) for added or
    replaced submodules and parameters. `busy()`: whether the runtime is inside a call of the model; hold nothing
    strongly in it (a bound method of the runtime would keep the runtime, and its model, alive: see weak_busy)."""

    def __init__(self, root: nn.Module, label: str, busy: Callable[[], bool],
                 on_added: Callable[[], None] | None = None):
        self.label, self.busy, self.on_added = label, busy, on_added  # on_added: weakly held too (weak_call)
        self.paths: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary(
            (m, path) for path, m in root.named_modules())
        self.added: list[tuple[str, str]] = []  # (path, "submodule" | "parameter")
        self.warned = False
        with _LOCK:
            if not _HANDLES:
                _HANDLES.append(torch_module.register_module_module_registration_hook(_on_module))
                _HANDLES.append(torch_module.register_module_parameter_registration_hook(_on_parameter))
            _WATCHES.add(self)

    def note(self, module: nn.Module, name: str, kind: str) -> None:
        path = self.paths.get(module)
        if path is None or self.busy():
            return
        self.added.append((f"{self.label}.{path}.{name}" if path else f"{self.label}.{name}", kind))
        if self.on_added is not None:
            self.on_added()

    def check(self) -> None:
        """Raise ResidencyError naming what was added since attach (once named, the next call raises again: the
        model stays changed until detach)."""
        if not self.added:
            return
        raise ResidencyError(f"{self._what()} added to the model while attached: {self._why()}",
                             hint="fuse projections, add adapters or new layers before attaching or after "
                                  "runtime.detach(), then attach again")

    def close(self) -> None:
        """Stop watching; warn once if anything was added (detach restores the planned weights, not these)."""
        with _LOCK:
            _WATCHES.discard(self)
            if not _WATCHES:
                for handle in _HANDLES:
                    handle.remove()
                _HANDLES.clear()
        if self.added and not self.warned:
            self.warned = True
            warnings.warn(f"{self._what()} added while the model was attached, left as made: "
                          f"{self._why()}; rebuild it now that the model is detached", stacklevel=user_stacklevel())

    def _what(self) -> str:
        (first, kind), more = self.added[0], len(self.added) - 1
        return f"{first} (a {kind})" + (f" and {more} more were" if more else " was")

    def _why(self) -> str:
        return ("no block of the plan holds it, and weights built from the model's parameters while attached read "
                "a streamed block's shared slot (another block's weights), so they may hold wrong values")
