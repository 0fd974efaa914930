"""The front door: `residency.attach(model, vram=…)` plans a model for this machine and runs it under the plan.

Exported lazily by `residency` itself, so `import residency` (and the CLI's start) loads no torch.
"""

from residency.front_door.attach_any import attach
from residency.front_door.detach import detach
from residency.front_door.foreign_hooks import refuse_foreign_hooks, refuse_pipeline_hooks
from residency.front_door.vram import vram_bytes

__all__ = ["attach", "detach", "refuse_foreign_hooks", "refuse_pipeline_hooks", "vram_bytes"]
