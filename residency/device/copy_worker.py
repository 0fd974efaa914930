"""The copy engine's worker thread: runs jobs in submission order beside compute, tickets in order.

torch releases the GIL inside copies and dequant kernels, so the worker overlaps the main thread. One worker
serves both the runtime's backends (a job is a LoadRecipe) and the CPU measurement (a job is a copy to time),
so the measured copy engine is the one that runs: it lives here, in the device layer, for both to import.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

Job = TypeVar("Job")  # runtime: a LoadRecipe; measurement: a copy callable
MARK_RING = 4096  # tickets whose timing marks are kept (far more than are ever in flight)
_BARRIER = object()  # a job that runs nothing: settle's, which completes its ticket in queue order


class CopyWorker(Generic[Job]):
    """FIFO executor: `submit` returns ticket n; `wait(n)` returns once jobs 1..n have run.

    A job that raises is re-raised to every later `wait`, and the jobs after it are skipped."""

    def __init__(self, execute: Callable[[Job, int], tuple[float, float, float]], name: str,
                 on_start: Callable[[], None] | None = None):
        self._on_start = on_start  # runs first on the worker thread (its own intra-op settings)
        self._started = threading.Event()
        self._execute = execute  # (job, ticket) -> (start, copied, end) marks
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._submitted = 0
        self._done = 0
        self._error: BaseException | None = None
        self.marks = np.zeros((MARK_RING, 3))  # written by the worker before it publishes the ticket
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread; returns once its on_start has run."""
        self._thread.start()
        self._started.wait()

    @property
    def next_ticket(self) -> int:
        """The ticket the next submit will return (a backend orders that load before submitting it)."""
        return self._submitted + 1

    def submit(self, job: Job) -> int:
        """Queue `job`; returns its ticket (1, 2, … in submission order).

        Hazard: a Ctrl-C between the count and the put leaves a ticket counted and never queued, which every
        later wait would wait for: settle() queues it (as a barrier), and the runtime settles after any call that
        raised."""
        ticket = self._submitted + 1
        self._submitted = ticket
        self._queue.put((ticket, job))
        return ticket

    def wait(self, ticket: int) -> None:
        """Return once jobs 1..ticket have run; re-raises the error of any job that failed."""
        # Fast path (an int read is atomic under the GIL). A load after a failure is skipped but still
        # counted done: without the error check, compute would run on a slot that was never filled.
        if self._done >= ticket and self._error is None:
            return
        with self._cond:
            while self._done < ticket and self._error is None:
                self._cond.wait()
        if self._error is not None:
            raise self._error

    def drain(self) -> None:
        """Wait for every submitted job (raises as `wait`)."""
        self.wait(self._submitted)

    def settle(self) -> None:
        """Wait until every submitted load has run or been skipped, without raising a load's error.

        For detach: the error already reached the step that waited on the load, and re-raising it here
        would leave the runtime half detached (hooks on, memory held) instead of recovering."""
        if self._thread.is_alive():
            # the last ticket counted, queued once more as a barrier: a submit cut short by Ctrl-C after its
            # count left it unqueued, and the wait below waited for it forever (a ticket queued twice is done twice)
            self._queue.put((self._submitted, _BARRIER))
        with self._cond:
            while self._done < self._submitted and self._thread.is_alive():
                self._cond.wait(timeout=1.0)

    def stop(self) -> None:
        """Let the queued jobs run (or be skipped), then end the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def stop_soon(self) -> None:
        """End the thread after its queued jobs, without waiting for it (a finalizer may run on this very thread,
        which cannot join itself)."""
        if self._thread.is_alive():
            self._queue.put(None)

    def _run(self) -> None:
        try:
            if self._on_start is not None:
                self._on_start()
        finally:
            self._started.set()
        while True:
            item = self._queue.get()
            if item is None:
                return
            ticket, job = item
            try:
                if self._error is None and job is not _BARRIER:  # after a failure, later loads are skipped
                    self.marks[ticket % MARK_RING] = self._execute(job, ticket)
            except BaseException as e:  # reported to the waiting thread, which re-raises it
                self._error = e
            with self._cond:
                self._done = max(self._done, ticket)  # a barrier may repeat a ticket already done
                self._cond.notify_all()
