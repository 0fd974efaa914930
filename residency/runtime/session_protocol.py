"""What the runtime may call on a session it steps: the step itself, a snapshot and a restore, its KV bytes.

A session owns its state (RNG, KV cache, counters); the runtime undoes a failed step only through these.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

Snap = TypeVar("Snap")  # what a snapshot is, the session's own type: the runtime only hands it back


class Recoverable(Protocol[Snap]):
    """State that a failed call can be rolled back to: snapshot() before it, restore() after it failed."""

    def snapshot(self, protect_kv: bool = True) -> Snap:
        """Take what the next step may change. protect_kv=False skips copying the state a step overwrites
        in place (a KV slot): cheaper, but a step that fails after its overwrite began cannot be undone."""
        ...

    def restore(self, snap: Snap) -> None:
        """Back exactly to `snap`, the latest snapshot taken (older ones may no longer restore)."""
        ...


class RecoverableSession(Recoverable[Snap], Protocol[Snap]):
    """A session `Runtime.step(session, action)` drives: one latent frame per step.

    Optionally `kv_frames` (an int attribute or property): the cached latent frames the next step reads. The
    runtime records it per frame, so that a calibration over the frames while the window fills costs each at the
    window it read; without it a frame is taken at the full window (after the first).
    """

    @property
    def kv_cache_bytes(self) -> int:
        """Device bytes the session's KV cache holds (the runtime accounts them in its ledger)."""
        ...

    def step(self, action: Any) -> Any:
        """Run one latent frame for `action`; returns what the session returns (a frame)."""
        ...
