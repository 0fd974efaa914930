"""Workloads: what the planner and the simulator know of a model — blocks, bytes, FLOPs, phases.

Built from catalog documents (JSON) that pipelines.catalog_build generates from real architectures, or from any
torch module and one counted forward (`workload_from_module`).
"""

from residency.workload.catalog import (
    CATALOG_SCHEMA_VERSION,
    load_workload_file,
    workload_from_dict,
    workload_to_dict,
)
from residency.workload.spec import (
    COMPUTE_DTYPE_BYTES,
    KV_DTYPE_BYTES,
    BlockSpec,
    PassSpec,
    PhaseSpec,
    Workload,
)

# The module builder imports accelerate and torch.func (~0.3 s): loaded on first use, not by every CLI command.
_FROM_MODULE = ("ModuleWorkload", "ModuleWorkloadWarning", "module_workload", "workload_from_module")


def __getattr__(name: str):
    if name in _FROM_MODULE:
        from residency.workload import from_module

        return getattr(from_module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CATALOG_SCHEMA_VERSION",
    "COMPUTE_DTYPE_BYTES",
    "KV_DTYPE_BYTES",
    "BlockSpec",
    "ModuleWorkload",
    "ModuleWorkloadWarning",
    "PassSpec",
    "PhaseSpec",
    "Workload",
    "load_workload_file",
    "module_workload",
    "workload_from_dict",
    "workload_from_module",
    "workload_to_dict",
]
