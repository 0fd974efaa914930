"""Recovery from running out of device memory: how far to shrink the budget, and how often to try.

The runtime retries the failed unit (a call of the model, or a session's step after its restore) under a
plan for the smaller budget; the session's state is its own (residency.runtime.session_protocol).
"""

from __future__ import annotations

import torch

from residency.runtime.ledger import DeviceBudgetExceeded

OOM_SHRINK = 0.9  # after a real out-of-memory, plan for 90 % of what was held
MAX_RECOVERIES = 4  # per retried unit; each one re-plans for a smaller budget
RECOVERABLE = (torch.OutOfMemoryError, DeviceBudgetExceeded)  # what a re-plan can cure


def recovery_budget(cause: BaseException, budget_bytes: int, held_bytes: int, device: torch.device) -> int:
    """The budget to re-plan for: the cut itself, or, after a real OOM, less than was held."""
    if isinstance(cause, DeviceBudgetExceeded):
        return budget_bytes
    budget = int(min(budget_bytes, held_bytes) * OOM_SHRINK)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)  # other programs' use shows here
        budget = min(budget, int((free + held_bytes) * OOM_SHRINK))
    return budget
