"""CheckpointError: the one exception for unreadable, hostile or unwritable checkpoint files.

Every message starts with the file's path, so the CLI's `error: …` line says which file is bad.
"""

from __future__ import annotations

import os

from residency.errors import ResidencyError

BROKEN_HINT = "the file looks truncated, corrupt or not a checkpoint; re-download or re-export it"


class CheckpointError(ResidencyError):
    """A checkpoint file that cannot be read (or written) as asked."""


def broken(path: str | os.PathLike[str], problem: str, hint: str | None = BROKEN_HINT) -> CheckpointError:
    """Build (not raise) a CheckpointError whose message is `<path>: <problem>`."""
    return CheckpointError(f"{os.fspath(path)}: {problem}", hint)
