"""An adopted rival's plan that the pinning repair changed keeps none of the rival's own notes: they described its
placement ("every block streamed at F32, tensor by tensor …", "16 of 17 blocks streamed"), and were printed above the
table that showed 5 blocks resident."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.catalog import catalog_paths
from policies import PlanRequest, get_policy
from residency.device import load_profile
from residency.plan import Budget
from residency.workload import load_workload_file

CPU_PROFILE = Path(__file__).parent / "data" / "measured-cpu-2-cores.json"
MIB = 2**20


@pytest.mark.parametrize(("dtype", "vram_mib"), [("fp32", 8), ("fp16", 8), ("fp32", 12)])
def test_a_repaired_adopted_plan_states_only_what_holds(dtype, vram_mib):
    w = load_workload_file(catalog_paths()["tiny"])
    p = get_policy("ours")(PlanRequest(w, load_profile(CPU_PROFILE), Budget(vram_mib * MIB), compute_dtype=dtype))
    kept = [n for n in p.notes if "kept resident instead" in n]
    streamed = sum(b.placement == "streamed" for b in p.blocks)
    for note in p.notes:
        assert not (note.startswith("every block streamed") and streamed < len(p.blocks)), note
        assert not (kept and "blocks streamed" in note and f"{streamed} of" not in note), note
    fastest = [n for n in p.notes if "of the fastest plan that fits (" in n]
    for n in fastest:  # the fastest named is never slower than the plan itself
        ms = float(n.split("of the fastest plan that fits (")[1].split(" ms")[0])
        assert ms <= round(p.prediction.frame_ms, 1) + 0.05, n
