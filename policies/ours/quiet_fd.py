"""The solver's own prints kept off this process's stdout, and scipy's warning about the options it passes on.

HiGHS, with RENS and RINS off (milp.HEURISTICS_OFF), can write a debug line ("HighsMipSolverData::
transformNewIntegerFeasibleSolution tmpSolver.run();") with C's printf, whatever its output options say: into
`residency plan --json`'s document, or a user's own stdout, during attach. Python's sys.stdout cannot catch a C
write, so file descriptor 1 points at /dev/null for the solve.

Hazard: a descriptor is process-wide, so another thread's writes to stdout in that window would be lost too. It
is done on the main thread only (the CLI's plan, attach); a re-plan on the closed loop's background thread runs
beside a live dashboard on the main thread, and is left as it is (at worst the line shows there).
Hazard: warnings' filters are process-wide too, and `warnings.catch_warnings` restores the list it saved on exit:
two threads each inside their own would leave one's filter in place for good. Solves on the planner's worker
threads (policies.ours.parallel) run inside one section the main thread holds for them.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

STDOUT_FD = 1
# scipy's milp warns so (a RuntimeWarning, and an OptimizeWarning from its HiGHS wrapper for an option that HiGHS
# does not know) for the heuristics' options it passes to HiGHS verbatim (policies.ours.milp.HEURISTICS_OFF)
PASSED_VERBATIM = "Unrecognized options detected"

_held = threading.local()  # .on: this thread is inside a section (its own, or one held for it)


@contextmanager
def solver_quiet() -> Iterator[None]:
    """Around a solve, or a section of solves: descriptor 1 dropped (stdout_fd_quiet) and scipy's warning about
    the options it passes on ignored. Inside a section this thread already has, a no-op."""
    if getattr(_held, "on", False):
        yield
        return
    with warnings.catch_warnings(), stdout_fd_quiet():
        warnings.filterwarnings("ignore", message=PASSED_VERBATIM)
        _held.on = True
        try:
            yield
        finally:
            _held.on = False


def held_by_caller() -> None:
    """A worker thread's initializer: its solves run in the section the thread that started it holds (only that
    thread changes the process-wide filters and descriptor)."""
    _held.on = True


@contextmanager
def stdout_fd_quiet() -> Iterator[None]:
    """Within the block, writes to descriptor 1 are dropped (main thread only; elsewhere a no-op). Cost: four
    system calls (~10 µs), against solves of 10-300 ms."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        sys.stdout.flush()  # what Python holds goes out before, to where it was meant to
        saved = os.dup(STDOUT_FD)
    except (OSError, ValueError, AttributeError):  # no descriptor 1 (a closed or replaced stdout): nothing to keep
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, STDOUT_FD)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, STDOUT_FD)
        os.close(saved)
