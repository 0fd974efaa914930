"""Checks the front doors (residency.attach, attach_pipeline) share: the backend asked for, and a warning when
the plan made cannot hold the time budget asked for."""

from __future__ import annotations

import warnings

import torch

from residency.errors import PlanWarning, ResidencyError, user_stacklevel
from residency.plan import Plan
from residency.units import fmt_bytes, fmt_ms


def backend_name(backend: str) -> str:
    """The backend `backend` names ("auto": the GPU when torch sees one); ResidencyError for an unknown name,
    or a GPU backend torch cannot see (before a profile is measured for it)."""
    if backend == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if backend not in ("cpu", "cuda", "rocm", "gpu"):
        raise ResidencyError(f"backend={backend!r}", hint="one of: auto, cpu, cuda (ROCm GPUs too)")
    if backend != "cpu" and not torch.cuda.is_available():  # before a profile is measured for a GPU that is not
        raise ResidencyError(f"backend={backend!r}, but torch sees no CUDA or ROCm GPU (torch {torch.__version__})",
                             hint='use backend="cpu" (or "auto"), or install a CUDA/ROCm build of torch')
    return backend


def warn_missed_budget(plan: Plan) -> None:
    """A PlanWarning when `plan` misses its time budget (no plan holds it: the command line exits 3 there), naming
    the user's line (a fixed stacklevel named attach_any.py for a pipeline, whose attach goes one call deeper)."""
    if plan.budget.frame_ms is not None and plan.prediction is not None and (
            plan.prediction.frame_ms > plan.budget.frame_ms):
        warnings.warn(f"the plan of {plan.model} misses the time budget: {fmt_ms(plan.prediction.frame_ms)} ms "
                      f"predicted per call against {fmt_ms(plan.budget.frame_ms)} ms; rt.plan.notes say why",
                      PlanWarning, stacklevel=user_stacklevel())


def warn_budget_beyond_device(vram_bytes: int, profile) -> None:
    """A vram= above what the profile's device has to use is planned for as asked (a what-if, or a profile that
    undercounts), and said so: "fits" then means fits the budget, not the device (`residency plan` notes the same)."""
    if vram_bytes > profile.memory_usable_bytes:
        warnings.warn(f"vram {fmt_bytes(vram_bytes)} is more than {profile.name} has to use "
                      f"({fmt_bytes(profile.memory_usable_bytes)}): planned for {fmt_bytes(vram_bytes)} as asked; a plan "
                      "that fits it may not fit the device", PlanWarning, stacklevel=user_stacklevel())
