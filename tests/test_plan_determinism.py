"""Planning is bounded by the solver's work limits, never by wall time: the same request gives the same plan
JSON (the timing note aside) however loaded the machine is."""

from __future__ import annotations

import json
import threading

import numpy as np

from pipelines.catalog import catalog_paths
from policies import PlanOptions, PlanRequest, get_policy
from policies.ours.milp import Problem
from policies.ours.options import block_classes
from policies.ours.problem import problem_for
from residency.device import load_profile
from residency.plan import Budget, Execution, plan_to_dict
from residency.workload import load_workload_file


def _plan_json(req: PlanRequest) -> str:
    doc = plan_to_dict(get_policy("ours")(req))
    doc["notes"] = [n for n in doc["notes"] if not n.startswith("planned in ")]
    return json.dumps(doc, sort_keys=True)


def _request() -> PlanRequest:
    # a tenth of a 12 GB card streams most of lucid-500m: every step of the search runs (MILP proposals,
    # the bisection, the pinning repair); a search cut at a wall-time deadline returns another plan here
    profile = load_profile("rtx-3060-12gb")
    return PlanRequest(load_workload_file(catalog_paths()["lucid-500m"]), profile,
                       Budget(profile.memory_usable_bytes // 10, None))


def _burn(stop: threading.Event) -> None:
    a = np.random.default_rng(0).standard_normal((256, 256))
    while not stop.is_set():
        a = np.tanh(a @ a)  # holds the GIL only between BLAS calls: the planner and this share the cores


def test_the_same_request_gives_the_same_plan_on_an_idle_and_a_busy_machine():
    req = _request()
    idle = _plan_json(req)
    stop = threading.Event()
    burners = [threading.Thread(target=_burn, args=(stop,), daemon=True) for _ in range(2)]
    for t in burners:
        t.start()
    try:
        busy = _plan_json(req)
    finally:
        stop.set()
        for t in burners:
            t.join()
    assert busy == idle


def test_no_solve_of_a_request_carries_a_wall_time_limit():
    req = _request()
    execution = Execution(prefetch_depth=1)
    classes = block_classes(req.workload, req, execution, "bf16")
    problem = problem_for(req, classes, execution, "bf16", vram_bytes=req.budget.vram_bytes, frame_s=None,
                          objective="time")
    assert problem.node_limit == PlanOptions().milp_node_limit and problem.node_limit > 0
    assert not any("time" in f and "limit" in f for f in Problem.__dataclass_fields__)


def test_the_timing_note_is_the_only_note_that_can_vary():
    notes = get_policy("ours")(_request()).notes
    assert sum(n.startswith("planned in ") for n in notes) == 1


def test_a_clock_that_races_ahead_changes_nothing(monkeypatch):
    # Under load every step takes longer; a clock jumping 10 s per reading is the extreme: any step that
    # stops at a wall-time deadline would stop at once and return a different plan.
    import time

    req = _request()
    calm = _plan_json(req)
    real = time.perf_counter
    jumps = iter(range(10**9))
    monkeypatch.setattr(time, "perf_counter", lambda: real() + 10.0 * next(jumps))
    assert _plan_json(req) == calm
