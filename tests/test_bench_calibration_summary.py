"""tools/bench_calibration.py's summary: medians over runs, and the closed-loop verdicts counted honestly."""

from __future__ import annotations

from tools.bench_calibration import summarise


def _loop(broke: bool, best_ms: float | None, budget_ms: float = 100.0, switches: int = 0, toggles: int = 5) -> dict:
    return {"held_within_frames": None, "after_switch": None, "switches": switches, "toggles": toggles,
            "budget_ms": budget_ms, "disturbed_first_plan_ms": 120.0 if broke else 90.0,
            "first_plan_disturbed_predicted_ms": 118.0, "best_plan_disturbed_predicted_ms": best_ms,
            "disturbance_broke_budget": broke}


def test_a_plan_that_holds_is_counted_only_in_runs_the_disturbance_broke():
    runs = [{"loop": _loop(broke=False, best_ms=80.0)},  # never broken: a holding plan here proves nothing
            {"loop": _loop(broke=True, best_ms=95.0)},  # broken, and another plan would hold
            {"loop": _loop(broke=True, best_ms=130.0)},  # broken, and nothing would
            {"loop": _loop(broke=True, best_ms=None)}]  # broken, too few frames to fit
    loop = summarise(runs)["loop"]
    assert loop["runs_disturbance_broke_budget"] == 3
    assert loop["runs_a_plan_holds_disturbed"] == 1


def test_switches_beyond_the_toggles_plus_one_fail_the_oscillation_check():
    calm = summarise([{"loop": _loop(broke=True, best_ms=95.0, switches=6, toggles=5)}])
    assert calm["pass"]["no_oscillation"]
    wild = summarise([{"loop": _loop(broke=True, best_ms=95.0, switches=7, toggles=5)}])
    assert not wild["pass"]["no_oscillation"]
