"""What the user changed on an attached model, refused at its next call: weights edited in place, modules or
parameters added, a block's forward replaced by one that skips the hook. A mixin of Runtime (every attribute it reads
is Runtime's); kept apart so each file holds one concern. The checks run per unit of work (a step, a top-level call),
and — once there is something to check — before each block call outside any unit (a pipeline called as pipe(...))."""

from __future__ import annotations

import threading

from torch import nn

from residency.runtime.hooks import check_removable
from residency.runtime.module_paths import module_path


class ModelWatching:
    """Runtime's checks of the attached model between its calls."""

    def _check_unchanged(self) -> None:
        """At the start of an outermost unit: in-place weight edits (every tensor's version), additions, forwards."""
        if self._weights is not None:
            self._weights.check()
        if self._structure is not None:
            self._structure.check()
        self._forwards.check()

    def _arm_outside_check(self) -> None:
        """Something was added to the model while attached: from now every block call outside a unit checks (until
        then the hot path pays one `is None` test)."""
        calls = self._calls
        if calls is not None:
            calls.outside_unit = self._outside_unit_check

    def _check_removable(self, module: nn.Module) -> None:
        check_removable(module, None if module is self._root else lambda: self._path_of(module))

    def _path_of(self, module: nn.Module) -> str:
        return module_path(self.pipeline, module)

    def _outside_unit_check(self) -> None:
        """Before a block's call: outside any unit of work (a diffusers pipeline called as pipe(...), which no unit
        wraps), refuse it after modules or parameters were added while attached, or a block's forward replaced, as a
        unit's start does. A unit's other check, in-place weight edits, reads every tensor's version: per unit, not
        per block call."""
        if self._in_unit:
            return
        structure = self._structure  # read once: a detach on another thread may clear it
        if structure is not None:
            structure.check()
        self._forwards.check()

    @property
    def _running_here(self) -> bool:
        """The model is running on this thread — a unit of work, or a block's call outside any (a pipeline called
        directly): what it registers is the model's own (another thread's additions meanwhile are the user's)."""
        here = threading.get_ident()
        if self._in_unit and self._unit_thread == here:
            return True
        calls = self._calls
        return calls is not None and calls.depth > 0 and calls.thread == here
