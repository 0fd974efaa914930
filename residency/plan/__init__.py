"""Plans: what the planner decides and the runtime executes, with the simulator's prediction.

`Plan` ties placement, format and dtype per block to one workload and one device profile.
"""

from residency.plan.plan import (
    COPY_MODES,
    DEQUANT_ON,
    LIFETIMES,
    PLACEMENTS,
    BlockPlan,
    Budget,
    Execution,
    Plan,
    Prediction,
)
from residency.plan.plan_io import (
    PLAN_SCHEMA_PATH,
    PLAN_SCHEMA_VERSION,
    load_plan,
    plan_from_dict,
    plan_to_dict,
    save_plan,
)

__all__ = [
    "PLAN_SCHEMA_PATH",
    "PLAN_SCHEMA_VERSION",
    "load_plan",
    "plan_from_dict",
    "plan_to_dict",
    "save_plan",
    "COPY_MODES",
    "DEQUANT_ON",
    "LIFETIMES",
    "PLACEMENTS",
    "BlockPlan",
    "Budget",
    "Execution",
    "Plan",
    "Prediction",
]
