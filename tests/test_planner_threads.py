"""The planner's depths on two threads (policies.ours.parallel): the same plan as on one, the solver kept quiet,
the process's warning filters as they were, and one thread only off the main thread."""

from __future__ import annotations

import importlib
import os
import threading
import warnings

import pytest
from sim_helpers import flat_profile
from test_pipeline_attach import CALL, tiny_flux

import policies.ours.milp as milp_module
from policies import PlanRequest, get_policy
from policies.ours.parallel import THREADS_ENV, Tasks, planning_threads
from residency.attach_pipeline import pipeline_workload
from residency.plan import Budget
from residency.simulate.lp_rows import LpRows

pytestmark = pytest.mark.usefixtures("one_compute_thread")

# the module, not the function policies.ours re-exports under its name
search_module = importlib.import_module("policies.ours.search")
SLOW_LINK = flat_profile(backend="cpu", link_gbps=0.01, overlap=0.0)


@pytest.fixture(scope="module")
def built():
    return pipeline_workload(tiny_flux(), CALL)


def _request(built, share: float, frame_ms: float | None = None) -> PlanRequest:
    total = built.workload.nbytes("F32")  # the whole model at F32: a share of it forces packing or streaming
    return PlanRequest(built.workload, SLOW_LINK, Budget(int(total * share), frame_ms),
                       compute_dtype=built.compute_dtype)


def _solve_threads(monkeypatch) -> list[str]:
    """The names of the threads each MILP solve runs on, from now on."""
    seen: list[str] = []
    real = milp_module.milp

    def recording(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(milp_module, "milp", recording)
    return seen


def _decisions(plan) -> tuple:
    return (tuple((b.name, b.placement, b.format, b.exec_mode) for b in plan.blocks), plan.execution,
            plan.kv_dtype, round(plan.prediction.frame_ms, 9), plan.prediction.quality_loss)


@pytest.mark.skipif(planning_threads() < 2, reason="this process may use one CPU only")
@pytest.mark.parametrize(("share", "frame_ms", "always_deeper"),
                         [(0.3, None, True), (0.6, 5.0, True), (0.3, None, False)])
def test_two_threads_plan_what_one_does(built, monkeypatch, share, frame_ms, always_deeper):
    """Every depth searched (always_deeper: the deeper ring is tried even where the first does not stall) or the
    default rule: the plan is the same on two threads as on one, and a worker thread did solve."""
    if always_deeper:
        monkeypatch.setattr(search_module, "DEEPER_IF_STALL", -1.0)
    req = _request(built, share, frame_ms)
    monkeypatch.setenv(THREADS_ENV, "1")
    seen = _solve_threads(monkeypatch)
    one = get_policy("ours")(req)
    assert set(seen) == {"MainThread"}
    seen.clear()
    monkeypatch.setenv(THREADS_ENV, "2")
    two = get_policy("ours")(req)
    assert _decisions(two) == _decisions(one)
    # which of the pool's workers takes a solve is the scheduler's: on a loaded box one worker took both
    # (['residency-plan_0', 'residency-plan_0', 'MainThread']); that solves ran beside the main thread is the point
    assert any(name.startswith("residency-plan") for name in seen), seen


def test_a_parallel_plan_leaves_the_warning_filters_and_stdout_as_they_were(built, monkeypatch, capfd):
    """scipy warns of the options it passes to HiGHS verbatim, and HiGHS can printf to descriptor 1; on the
    workers both stay quiet, and the filters are the caller's again afterwards (no "error" or "ignore" left)."""
    monkeypatch.setenv(THREADS_ENV, "2")
    monkeypatch.setattr(search_module, "DEEPER_IF_STALL", -1.0)
    real = milp_module.milp

    def chatty(*args, **kwargs):
        os.write(1, b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(milp_module, "milp", chatty)
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        print("before", flush=True)
        get_policy("ours")(_request(built, 0.3))
        print("after", flush=True)
    assert warnings.filters == before
    assert not [w for w in caught if "Unrecognized options" in str(w.message)]
    assert capfd.readouterr().out == "before\nafter\n"


def test_off_the_main_thread_a_plan_solves_on_its_own_thread_only(built, monkeypatch):
    """A re-plan on the closed loop's background thread gets no second core, and nothing speculative runs."""
    monkeypatch.setenv(THREADS_ENV, "2")
    seen = _solve_threads(monkeypatch)
    got = {}

    def background():
        got["threads"] = planning_threads()
        got["plan"] = get_policy("ours")(_request(built, 0.3))

    t = threading.Thread(target=background, name="replan")
    t.start()
    t.join()
    assert got["threads"] == 1 and got["plan"] is not None
    assert seen and set(seen) == {"replan"}


def test_one_thread_runs_a_task_only_when_its_result_is_asked_for():
    calls = []
    with Tasks(1) as tasks:
        first = tasks.submit(lambda: calls.append("first") or 1)
        tasks.submit(lambda: calls.append("never"))
        assert calls == []
        assert first.result() == 1 and first.result() == 1
    assert calls == ["first"]


@pytest.mark.parametrize("value", ["0", "-1", "two", ""])
def test_a_thread_cap_that_is_not_a_positive_integer_is_ignored(monkeypatch, value):
    monkeypatch.setenv(THREADS_ENV, value)
    assert 1 <= planning_threads() <= 2


def test_lp_rows_are_a_sparse_matrix_without_zeros():
    rows = LpRows(3)
    rows.add({0: 1.0, 2: 0.0}, 0.0, 1.0)
    rows.add({1: 2.0}, -1.0, 5.0)
    c = rows.constraint()
    assert c.A.toarray().tolist() == [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    assert c.A.nnz == 2 and list(c.lb) == [0.0, -1.0] and list(c.ub) == [1.0, 5.0]
    with pytest.raises(IndexError, match="column 3 of a 3-column"):
        rows.add({3: 1.0}, 0.0, 1.0)
