"""The copy engine's worker: a failed load reaches the step that waits on it, and detach still finishes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sim_helpers import flat_profile
from test_runtime import run_plain, tiny_plan

from pipelines.world_model import WorldModelPipeline
from pipelines.world_model.workload import catalog_entry
from residency.runtime import Runtime, backend_cpu
from residency.runtime.copy_worker import CopyWorker
from residency.workload import workload_from_dict

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def _worker_failing_at(ticket_that_fails: int) -> CopyWorker:
    def execute(_recipe, ticket):
        if ticket == ticket_that_fails:
            raise torch.OutOfMemoryError("injected: the copy engine's allocation failed")
        return (float(ticket), float(ticket), float(ticket))

    worker = CopyWorker(execute, "test-copy")
    worker.start()
    return worker


def test_a_failed_load_is_raised_to_its_waiter_and_settle_does_not_raise_it_again():
    worker = _worker_failing_at(2)
    try:
        worker.wait(worker.submit(None))
        worker.submit(None)
        last = worker.submit(None)
        worker.settle()  # returns once the failed load ran and the one after it was skipped, without raising
        with pytest.raises(torch.OutOfMemoryError, match="injected"):
            worker.wait(last)  # skipped after the failure: never reported as landed
        with pytest.raises(torch.OutOfMemoryError):
            worker.drain()
    finally:
        worker.stop()


def test_next_ticket_is_what_submit_returns():
    worker = _worker_failing_at(0)
    try:
        expected = worker.next_ticket
        assert worker.submit(None) == expected
        assert worker.next_ticket == expected + 1
    finally:
        worker.stop()


def test_out_of_memory_in_the_copy_engine_recovers_like_one_in_compute(monkeypatch):
    w = workload_from_dict(catalog_entry("tiny"))
    pipe = WorldModelPipeline.from_config("tiny")
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    actions = ["up", "down"]
    expected = run_plain(pipe, image, actions, seed=5)
    profile = flat_profile(backend="cpu")
    rt = Runtime(tiny_plan(w, "streamed", depth=2, profile=profile), "cpu", workload=w, profile=profile,
                 replan=lambda budget, profile: tiny_plan(w, "streamed", depth=1, vram=budget.vram_bytes,
                                                          profile=profile)).attach(pipe)
    s = pipe.start(image, seed=5)
    got = [rt.step(s, actions[0])]
    loads = {"n": 0}
    real = backend_cpu.execute_on_host

    def fails_once(recipe):
        loads["n"] += 1
        if loads["n"] == 3:
            raise torch.OutOfMemoryError("injected: the copy engine's allocation failed")
        return real(recipe)

    monkeypatch.setattr(backend_cpu, "execute_on_host", fails_once)
    got += [rt.step(s, a) for a in actions[1:]]
    rt.detach()
    assert [cause for cause, _ in rt.recoveries] == ["OutOfMemoryError"]
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)
