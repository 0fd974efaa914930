"""The backend contract: device buffers, a copy engine beside compute, and timestamps for telemetry.

CPU (a worker thread) and CUDA/ROCm (a copy stream fed by a worker thread) implement it;
`residency.runtime.backends.get_backend` picks one by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from residency.formats.base import StorageFormat


@dataclass(frozen=True)
class LoadRecipe:
    """One precomputed load of a block: its blob copied whole, then (optionally) unpacked per tensor.

    Built at attach, so a load allocates no tensor: every source and destination is a view made once.
    """

    label: str  # block name, or "load <block>"
    link_bytes: int  # host->device bytes this load moves
    copy_src: torch.Tensor | None  # host blob (uint8) copied as one transfer, or None
    copy_dst: torch.Tensor | None  # device bytes it lands in
    # (format, packed source, compute-dtype output) run after the copy; plain same-dtype entries come first
    unpacks: tuple[tuple[StorageFormat, torch.Tensor, torch.Tensor], ...] = ()
    plain_unpacks: int = 0  # how many leading unpacks are plain casts/copies (timed as copy, not dequant)


class Backend(Protocol):
    """Device buffers, a copy engine running beside compute, and timestamps, for one device kind."""
    name: str  # "cpu" | "cuda" | "rocm"
    device: torch.device
    compute_threads: int  # CPU: intra-op threads while attached; GPU: 0

    def start(self) -> None:
        """Create the copy engine (thread, stream, pinned ring); CPU: leave a core to it."""

    def stop(self) -> None:
        """Finish in-flight copies, stop the engine, restore thread settings."""

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 device buffer (raises torch.OutOfMemoryError when the device is full)."""

    def unpack_staging_bytes(self, largest_unpacked_blob_bytes: int) -> int:
        """Device bytes the backend needs to unpack a host blob on the device (CPU: 0)."""

    def make_recipe(self, label: str, blob: torch.Tensor, dst: torch.Tensor | None,
                    unpacks: list[tuple[StorageFormat, int, int, torch.Tensor]], plain_unpacks: int) -> LoadRecipe:
        """A load of `blob`: whole into `dst`, or unpacked per (format, offset, nbytes, output view)."""

    def submit(self, recipe: LoadRecipe) -> int:
        """Queue a load on the copy engine, ordered after all compute issued so far; returns its ticket."""

    def wait(self, ticket: int) -> None:
        """Make compute wait for a ticket's load (CPU: the host waits; GPU: the compute stream does)."""

    def run_now(self, recipe: LoadRecipe) -> None:
        """Load synchronously on the compute side (copy_mode "sync", resynchronisation)."""

    def drain(self) -> None:
        """Wait until every submitted load has been issued (host side); raises a failed load's error."""

    def settle(self) -> None:
        """As drain, for detach: a failed load's error (already raised to its waiter) is not raised again."""

    def clock(self) -> float:
        """A compute-side timestamp mark, resolved to seconds by resolve()."""

    def copy_marks(self, ticket: int) -> tuple[float, float, float]:
        """(start, copied, end) marks of a ticket's load, valid once wait(ticket) returned."""

    def resolve(self, marks: np.ndarray) -> np.ndarray:
        """Marks -> seconds on one clock; called once per frame, after the frame's results are read."""
