"""residency: VRAM as a managed cache for diffusion world models on consumer GPUs.

`residency.attach(model, vram="50%")` plans any model for this machine and runs it under the plan. The long
form is exported here too: a workload (`workload_from_module`), a device profile (`machine_profile`,
`load_profile`), a plan (`make_plan`, `save_plan`/`load_plan`) and the `Runtime` that executes it; plus the
storage formats (`get_format`) and checkpoint I/O (`open_checkpoint`, `save_checkpoint`).
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# name -> module defining it. Loaded on first use: most of them import torch and the planner (~1 s), which
# `import residency` (and the CLI's start) must not pay.
_EXPORTS = {
    "attach": "residency.front_door",
    "detach": "residency.front_door",
    "Runtime": "residency.runtime",
    "DeviceProfile": "residency.device",
    "load_profile": "residency.device",
    "machine_profile": "residency.device",
    "get_format": "residency.formats",
    "open_checkpoint": "residency.checkpoint",
    "save_checkpoint": "residency.checkpoint",
    "Budget": "residency.plan",
    "Plan": "residency.plan",
    "load_plan": "residency.plan",
    "save_plan": "residency.plan",
    "make_plan": "residency.planning",
    "workload_from_module": "residency.workload",
    "ResidencyError": "residency.errors",
    "BudgetError": "residency.errors",
    "InferenceOnlyWarning": "residency.errors",
    "PlanWarning": "residency.errors",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'residency' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]
