"""residency: VRAM as a managed cache for diffusion world models on consumer GPUs.

`residency.attach(model, vram="50%")` plans any model for this machine and runs it under the plan; the
data layer (formats, checkpoint, device, workload, plan, simulate) is the public API beneath it.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: the front door imports torch and the planner (~1 s); `import residency` and the CLI's start do not.
    if name == "attach":
        from residency.front_door import attach

        globals()["attach"] = attach
        return attach
    raise AttributeError(f"module 'residency' has no attribute {name!r}")


__all__ = ["__version__", "attach"]
