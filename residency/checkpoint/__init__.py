"""Checkpoint I/O: validated, memory-mapped reading and atomic writing of .safetensors and .gguf.

Hostile or broken files raise CheckpointError (naming the file), never anything else.
"""

from __future__ import annotations

from residency.checkpoint.checkpoint import Checkpoint, open_checkpoint
from residency.checkpoint.entry import FORMAT_KEY, SHAPE_KEY, TensorEntry
from residency.checkpoint.errors import CheckpointError
from residency.checkpoint.packing import PackedTensor, choose_format
from residency.checkpoint.writer import save_checkpoint, write_packed

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "FORMAT_KEY",
    "PackedTensor",
    "SHAPE_KEY",
    "TensorEntry",
    "choose_format",
    "open_checkpoint",
    "save_checkpoint",
    "write_packed",
]
