"""The runtime: executes a plan on a real model — host store, copy engine, device slots, dequant, eviction.

`Runtime(plan, backend, workload=…).attach(pipeline)` hooks the pipeline's blocks; `detach()` restores it.
"""

from residency.runtime.backend import Backend, LoadRecipe, get_backend
from residency.runtime.host_store import HostMemoryExceeded, HostStore, clear_host_cache
from residency.runtime.ledger import KINDS, DeviceBudgetExceeded, Ledger, LedgerSnapshot
from residency.runtime.runtime import Runtime

__all__ = [
    "KINDS",
    "Backend",
    "DeviceBudgetExceeded",
    "HostMemoryExceeded",
    "HostStore",
    "Ledger",
    "LedgerSnapshot",
    "LoadRecipe",
    "Runtime",
    "clear_host_cache",
    "get_backend",
]
