"""The device-memory ledger: every device byte the runtime holds, by kind, against a changeable budget.

Allocation sites reserve before they allocate, so an over-budget plan fails before touching memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from residency.errors import BudgetError
from residency.simulate.memory import LEDGER_KINDS
from residency.units import fmt_bytes

KINDS = LEDGER_KINDS


class DeviceBudgetExceeded(BudgetError):
    """The device-memory budget cannot hold what the runtime needs (at attach, or after a cut): a BudgetError, as
    `attach`'s "no plan fits", so one `except residency.BudgetError` catches both."""


@dataclass(frozen=True)
class LedgerSnapshot:
    """The ledger's accounts at one moment, in bytes: budget, held and peak per kind and in total."""
    budget_bytes: int
    current_bytes: tuple[tuple[str, int], ...]  # (kind, bytes held now), in KINDS order
    peak_bytes: tuple[tuple[str, int], ...]  # (kind, most bytes ever held), in KINDS order
    total_bytes: int  # held now, all kinds
    peak_total_bytes: int  # most ever held at once, all kinds


class Ledger:
    """Bytes held per kind. Not thread-safe: only the thread that drives the model accounts."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self._current = dict.fromkeys(KINDS, 0)
        self._peak = dict.fromkeys(KINDS, 0)
        self.total_bytes = 0
        self.peak_total_bytes = 0

    def _check_kind(self, kind: str) -> None:
        if kind not in self._current:
            raise ValueError(f"unknown memory kind {kind!r}; one of {', '.join(KINDS)}")

    def reserve(self, kind: str, nbytes: int, what: str = "") -> None:
        """Account `nbytes` more of `kind`; refuses (nothing accounted) when it would pass the budget."""
        self._check_kind(kind)
        nbytes = int(nbytes)
        if self.total_bytes + nbytes > self.budget_bytes:
            raise DeviceBudgetExceeded(
                f"device memory budget exceeded: {what or kind} needs {fmt_bytes(nbytes)} more, "
                f"{fmt_bytes(self.total_bytes)} held of a {fmt_bytes(self.budget_bytes)} budget"
                + (f" ({self.describe()})" if self.total_bytes else ""),
                hint="raise the budget, or make a plan for this budget (more blocks streamed or quantized)")
        self._current[kind] += nbytes
        self.total_bytes += nbytes
        self._peak[kind] = max(self._peak[kind], self._current[kind])
        self.peak_total_bytes = max(self.peak_total_bytes, self.total_bytes)

    def release(self, kind: str, nbytes: int) -> None:
        """Account `nbytes` of `kind` as freed.

        Raises ValueError for an unknown kind or when more is released than is held.
        """
        self._check_kind(kind)
        nbytes = int(nbytes)
        if nbytes > self._current[kind]:
            raise ValueError(f"releasing {nbytes} bytes of {kind}, only {self._current[kind]} held")
        self._current[kind] -= nbytes
        self.total_bytes -= nbytes

    def release_all(self) -> None:
        """Account every kind as empty (detach); peaks are kept."""
        for kind in KINDS:
            self._current[kind] = 0
        self.total_bytes = 0

    def set_budget(self, budget_bytes: int) -> None:
        """Change the budget at run time; a cut below current use shows as `over_budget` (see check())."""
        self.budget_bytes = int(budget_bytes)

    @property
    def over_budget(self) -> bool:
        """True when more bytes are held than the budget (after a budget cut)."""
        return self.total_bytes > self.budget_bytes

    def check(self) -> None:
        """Raise DeviceBudgetExceeded when the budget was cut below what is held (an accounting point)."""
        if self.total_bytes > self.budget_bytes:
            raise DeviceBudgetExceeded(
                f"device memory budget cut to {fmt_bytes(self.budget_bytes)}, "
                f"{fmt_bytes(self.total_bytes)} held ({self.describe()})",
                hint="the runtime re-plans for the new budget when it was given a replan callable")

    def current(self, kind: str) -> int:
        """Bytes of `kind` held now (KeyError for an unknown kind)."""
        return self._current[kind]

    def peak(self, kind: str) -> int:
        """Most bytes of `kind` ever held at once (KeyError for an unknown kind)."""
        return self._peak[kind]

    def describe(self) -> str:
        """The kinds held now with their sizes, e.g. "slots 1.2 GiB, kv_cache 64 MiB" (empty ones left out)."""
        return ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self._current.items() if v)

    def snapshot(self) -> LedgerSnapshot:
        """An immutable copy of the accounts now."""
        return LedgerSnapshot(self.budget_bytes, tuple(self._current.items()), tuple(self._peak.items()),
                              self.total_bytes, self.peak_total_bytes)
