"""Ctrl-C can land between any two lines of the runtime's own code during a call. Whatever line it lands on, the
next call must be exact, no wait may hang, and detach must restore the model. Found by raising KeyboardInterrupt
at chosen lines: a submit cut short after its ticket was counted hung the next call and detach forever; one cut
between the submit and the slot's tag computed the next call on another block's weights; a bind cut short was
refused ever after as a weight replaced; a unit flag set outside its try left every later call unchecked."""

from __future__ import annotations

import faulthandler
import sys
import threading
from collections import Counter

import pytest
import torch
from torch import nn

import residency
from residency.device.copy_worker import CopyWorker

pytestmark = pytest.mark.usefixtures("one_compute_thread")
OURS = "/residency/"


def _lines_of_one_call(model, x) -> int:
    n = 0

    def count(frame, event, arg):
        nonlocal n
        if OURS in frame.f_code.co_filename and event == "line":
            n += 1
        return count

    sys.settrace(count)
    try:
        with torch.no_grad():
            model(x)
    finally:
        sys.settrace(None)
    return n


def _interrupted_at(model, x, k: int, where: Counter) -> None:
    """One call of `model` with a KeyboardInterrupt raised at the k-th line of residency code it runs; the line is
    counted in `where`."""
    n = 0

    def trace(frame, event, arg):
        nonlocal n
        if OURS in frame.f_code.co_filename and event == "line":
            n += 1
            if n == k:
                where[(frame.f_code.co_filename, frame.f_lineno)] += 1
                raise KeyboardInterrupt
        return trace

    sys.settrace(trace)
    try:
        with torch.no_grad():
            model(x)
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)


@pytest.mark.parametrize("vram", ["30%", None])
def test_a_call_interrupted_at_any_line_leaves_the_runtime_exact(vram):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)]).eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rt = residency.attach(model, vram=vram, example_inputs=x)
    with torch.no_grad():
        model(x)
    lines = _lines_of_one_call(model, x)
    assert lines > 100
    faulthandler.dump_traceback_later(240, exit=True)  # a hang fails the run (with where), not the CI's clock
    try:
        where: Counter = Counter()
        for k in range(1, lines + 1):
            _interrupted_at(model, x, k, where)
            with torch.no_grad():
                got = model(x)
            assert torch.equal(got, expected), f"interrupted at line {k} of a call: the next call differs"
        # the interrupts spread over the call's code (a record left by each cut call once grew a loop that took
        # 82 % of them), and the telemetry still pairs each frame with its rows
        assert max(where.values()) < lines // 10, where.most_common(3)
        snap = rt.telemetry()
        assert len(snap.frames) == len(snap.rows) and snap.frames
    finally:
        faulthandler.cancel_dump_traceback_later()
        rt.detach()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_ticket_counted_but_never_queued_does_not_hang_settle():
    ran = []
    worker = CopyWorker(lambda job, ticket: (ran.append(job), (0.0, 0.0, 0.0))[1], "test-copy")
    worker.start()
    try:
        worker.wait(worker.submit("a"))
        worker._submitted += 1  # what a Ctrl-C between submit's count and its put leaves
        done = threading.Event()
        t = threading.Thread(target=lambda: (worker.settle(), done.set()), daemon=True)
        t.start()
        assert done.wait(10), "settle waited for a ticket that was never queued"
        worker.wait(worker.submit("b"))  # and the worker goes on in order
        assert ran == ["a", "b"]
    finally:
        worker.stop()
