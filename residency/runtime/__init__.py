"""The runtime: executes a plan on a real model — host store, copy engine, device slots, dequant, eviction.

`Runtime(plan, backend, workload=…).attach(model)` hooks the model's blocks (found by module path) and its
forward (the unit a recovery retries); `detach()` restores it. A session it steps is a RecoverableSession.
"""

from residency.runtime.backend import Backend, LoadRecipe
from residency.runtime.backends import get_backend
from residency.runtime.host_store import HostMemoryExceeded, HostStore, clear_host_cache
from residency.runtime.ledger import KINDS, DeviceBudgetExceeded, Ledger, LedgerSnapshot
from residency.runtime.runtime import ReplanFn, Runtime
from residency.runtime.session_protocol import Recoverable, RecoverableSession

__all__ = [
    "KINDS",
    "Backend",
    "DeviceBudgetExceeded",
    "HostMemoryExceeded",
    "HostStore",
    "Ledger",
    "LedgerSnapshot",
    "LoadRecipe",
    "Recoverable",
    "RecoverableSession",
    "ReplanFn",
    "Runtime",
    "clear_host_cache",
    "get_backend",
]
