"""Error types for user-facing mistakes: each carries a message and a hint.

The CLI prints them as `error: …` / `hint: …` without a traceback; anything else is a bug.
"""

from __future__ import annotations

import os
import sys


class ResidencyError(Exception):
    """A problem the user can fix: bad input, bad file, a budget that cannot hold."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        # the hint on its own line: an uncaught error's traceback shows it to a library user (the CLI prints
        # message and hint itself), and readers of the first line get the message alone
        return f"{self.message}\nhint: {self.hint}" if self.hint else self.message


class UsageError(ResidencyError):
    """A malformed command line or argument value (exit 2)."""

    exit_code = 2


class BudgetError(ResidencyError):
    """No plan fits the VRAM budget a command was given (exit 3, as `plan`'s for a budget it cannot meet)."""

    exit_code = 3


class ForwardReplacedError(ResidencyError, RuntimeError):
    """Detach refused: a module's forward was wrapped again after residency installed its own, and taking ours off
    would drop that wrapper. A RuntimeError too, as it was before it carried a hint."""


class FormatError(ResidencyError):
    """An unknown storage format, or a shape the format cannot hold."""


class InferenceOnlyWarning(UserWarning):
    """An attached model was called with autograd on: the runtime ran the call without it (see Runtime)."""


class PlanWarning(UserWarning):
    """A plan was made, but it does not hold what was asked (a time budget no plan meets)."""


# residency's own packages (torch's is added where loaded: this module never imports it, the CLI's help stays quick)
# (abspath, not resolve: a frame's file name is the path as imported, symlinks kept)
_OWN_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), pkg) + os.sep
                  for pkg in ("residency", "policies", "pipelines"))


def user_stacklevel() -> int:
    """warnings.warn's stacklevel of the first frame outside residency's packages and torch (the user's call),
    counted from the function calling warn: the warning then names the user's line, once per line. A fixed
    stacklevel named residency/front_door/attach_any.py:254 for a warning raised deep inside attach()."""
    torch_module = sys.modules.get("torch")
    torch_dir = (os.path.dirname(torch_module.__file__) + os.sep,) if getattr(torch_module, "__file__", None) else ()
    skipped = _OWN_DIRS + torch_dir
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skipped):
        frame, level = frame.f_back, level + 1
    return level
