"""The sessions a runtime has stepped that are still alive, and the KV-cache bytes they hold together.

Two sessions of one model (two players, a new game started while the old one is kept) each hold their own KV
cache on the device; the ledger counts every one still referenced, not only the last stepped. A session is
followed by a weak reference: dropped (garbage), it stops counting at the next step. One that cannot be weakly
referenced counts until another such session is stepped.
Cost: a dict pass over the live sessions per step (usually one or two entries).
"""

from __future__ import annotations

import weakref
from typing import Any


class LiveSessions:
    def __init__(self) -> None:
        self._held: dict[int, tuple[weakref.ref | None, int]] = {}  # id -> (weak reference or None, KV bytes)

    def kv_bytes(self, session: Any, nbytes: int) -> tuple[int, int]:
        """Record `session` holding `nbytes` of KV cache now; (the live sessions' bytes, how many there are)."""
        self._held = {k: (ref, n) for k, (ref, n) in self._held.items() if ref is not None and ref() is not None}
        try:
            ref = weakref.ref(session)
        except TypeError:  # no weak reference to it: it stands in for every session of its kind
            ref = None
        self._held[id(session)] = (ref, int(nbytes))
        return sum(n for _, n in self._held.values()), len(self._held)

    def held_bytes(self) -> int:
        """The KV bytes of the sessions still alive (as last stepped)."""
        return sum(n for ref, n in self._held.values() if ref is None or ref() is not None)
