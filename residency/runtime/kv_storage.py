"""The KV cache's storage dtype as the plan sets it (Plan.kv_dtype), on a pipeline whose config names one.

The planner may store the cache in FP8 where nothing fits in the workload's own dtype (policies.ours.search), and
charges the cache at the plan's dtype; the world model's sessions build their cache from `pipeline.config.kv_dtype`
when they start. Left at the config's, a plan that fit at FP8 ran out of its budget at the first step ("the
session's KV cache needs 768 KiB more").
"""

from __future__ import annotations

import dataclasses
from typing import Any

from residency.plan import Plan


def use_plan_kv_dtype(pipeline: Any, plan: Plan) -> Any | None:
    """Set `pipeline.config.kv_dtype` to the plan's, so that sessions started from now store their cache as planned
    (one already running keeps its own, and the ledger charges what it holds). Returns the config replaced, to put
    back at detach; None where the pipeline has no such config or it already says so."""
    config = getattr(pipeline, "config", None)
    current = getattr(config, "kv_dtype", None)
    if not isinstance(current, str) or current == plan.kv_dtype or not dataclasses.is_dataclass(config):
        return None
    pipeline.config = dataclasses.replace(config, kv_dtype=plan.kv_dtype)
    return config
