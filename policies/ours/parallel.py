"""The planner's independent work on two threads, where a core is free for it.

HiGHS releases the GIL while it solves, and solves are most of a slow plan's time (lucid-800m on the RTX 3060
at 10%: 13 solves, ~2.0 of 2.8 s), so two solves on two threads take about the time of one. The result is the same
bits as on one thread: each task is a pure function of its arguments, and the caller reads the results in its
own order. On two threads a task the caller then does not need (the deeper ring, where the first one did not
stall) has run anyway: CPU time spent, not wall time.

Only on the main thread (the CLI's plan, attach), where the process may use two CPUs or more. A re-plan on the
closed loop's background thread runs beside the compute thread and is not given a second core: there (and with
RESIDENCY_PLAN_THREADS=1) a task runs when its result is first asked for, which is the sequential search exactly,
nothing speculative.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from policies.ours.quiet_fd import held_by_caller, solver_quiet

MAX_THREADS = 2  # the search has two independent lines of work (the prefetch depths)
THREADS_ENV = "RESIDENCY_PLAN_THREADS"


def planning_threads() -> int:
    """Threads for this plan: 1 off the main thread, else up to MAX_THREADS of the CPUs this process may use
    (RESIDENCY_PLAN_THREADS caps it; a value that is not a positive integer is ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    cap = os.environ.get(THREADS_ENV, "")
    limit = int(cap) if cap.isdigit() and int(cap) > 0 else MAX_THREADS
    return max(1, min(limit, cpus, MAX_THREADS))


class Deferred:
    """A task's result: computed on a worker already, or (one thread) on the first `result()`, once."""

    def __init__(self, fn: Callable[..., Any], args: tuple, future: Future | None) -> None:
        self._fn, self._args, self._future = fn, args, future
        self._done, self._value = False, None

    def result(self) -> Any:
        if self._future is not None:
            return self._future.result()
        if not self._done:
            self._value = self._fn(*self._args)
            self._done = True
        return self._value


class Tasks:
    """`with Tasks(n) as tasks: d = tasks.submit(fn, *args) … d.result()`. On n > 1 threads, tasks run in the
    order submitted; a task may wait on the result of one submitted before it (never after: the pool could
    deadlock). The solver's quiet section (policies.ours.quiet_fd) is held by this thread for the workers'
    solves. On leaving, tasks not started are dropped and running ones are waited for (a solve cannot be
    interrupted: up to its own time, ~0.4 s)."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, int(threads))
        self._pool: ThreadPoolExecutor | None = None
        self._quiet = None

    def __enter__(self) -> Tasks:
        if self.threads > 1:
            self._quiet = solver_quiet()
            self._quiet.__enter__()
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="residency-plan",
                                            initializer=held_by_caller)
        return self

    def submit(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        future = self._pool.submit(fn, *args) if self._pool is not None else None
        return Deferred(fn, args, future)

    def __exit__(self, *exc: object) -> None:
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
        finally:
            if self._quiet is not None:
                self._quiet.__exit__(None, None, None)


__all__ = ["MAX_THREADS", "THREADS_ENV", "Deferred", "Tasks", "planning_threads"]
