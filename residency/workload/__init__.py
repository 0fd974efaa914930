"""Workloads: what the planner and the simulator know of a model — blocks, bytes, FLOPs, phases.

Built from catalog documents (JSON) that tools/gen_catalog.py generates from real architectures.
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

__all__ = [
    "CATALOG_SCHEMA_VERSION",
    "COMPUTE_DTYPE_BYTES",
    "KV_DTYPE_BYTES",
    "BlockSpec",
    "PassSpec",
    "PhaseSpec",
    "Workload",
    "load_workload_file",
    "workload_from_dict",
    "workload_to_dict",
]
