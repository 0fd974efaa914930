"""Atomic replacement of checkpoint files: residency.atomic_file's, failing with a CheckpointError.

The checkpoint writers use this one, so a file that cannot be written raises the checkpoint layer's error.
"""

from __future__ import annotations

from functools import partial

from residency.atomic_file import atomic_output as _atomic_output
from residency.checkpoint.errors import CheckpointError

atomic_output = partial(_atomic_output, error=CheckpointError)

__all__ = ["atomic_output"]
