"""Error types for user-facing mistakes: each carries a message and a hint.

The CLI prints them as `error: …` / `hint: …` without a traceback; anything else is a bug.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


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


class FormatError(ResidencyError):
    """An unknown storage format, or a shape the format cannot hold."""


class InferenceOnlyWarning(UserWarning):
    """An attached model was called with autograd on: the runtime ran the call without it (see Runtime)."""


class PlanWarning(UserWarning):
    """A plan was made, but it does not hold what was asked (a time budget no plan meets)."""


_OURS = tuple(str(Path(__file__).resolve().parent.parent / pkg) + os.sep for pkg in ("residency", "policies", "pipelines"))
# (frames of the packages above are skipped; a test or a user script beside them is not)


def user_stacklevel() -> int:
    """The stacklevel that points a warnings.warn made by this function's caller at the first frame outside
    residency's own packages: a warning raised deep inside attach() named residency/front_door/attach_any.py:254,
    while the same warning from workload_from_module() named the user's line at a fixed stacklevel."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_OURS):
        frame, level = frame.f_back, level + 1
    return level
