"""The CPU backend: device memory is CPU memory the ledger accounts; the copy engine is a worker thread.

Compute runs at max(1, cores − 1) intra-op threads so that the copy thread has a core, as a GPU has copy engines;
torch's thread count is process-wide, so it is the caller's again once the last CPU backend stops.
"""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import torch

from residency.device.host_cpu import usable_cores
from residency.formats.base import StorageFormat
from residency.runtime.backend import LoadRecipe
from residency.runtime.copy_worker import MARK_RING, CopyWorker


def execute_on_host(recipe: LoadRecipe) -> tuple[float, float, float]:
    """Run a load where its sources already are (host memory): copy, then unpack; perf_counter marks."""
    t0 = time.perf_counter()
    if recipe.copy_src is not None:
        recipe.copy_dst.copy_(recipe.copy_src)
    for fmt, src, out in recipe.unpacks[:recipe.plain_unpacks]:
        fmt.unpack(src, out)
    t1 = time.perf_counter()
    for fmt, src, out in recipe.unpacks[recipe.plain_unpacks:]:
        fmt.unpack(src, out)
    return t0, t1, time.perf_counter()


class _CallerThreads:
    """torch's intra-op thread count is process-wide: the first backend to start saves the caller's and the
    last to stop restores it (two runtimes attached at once would otherwise restore each other's count)."""

    def __init__(self) -> None:
        self.users, self.saved = 0, 0
        self.lock = threading.Lock()

    def hold(self) -> None:
        """Before anything sets a count (the copy worker's set_num_threads reaches process-wide BLAS too)."""
        with self.lock:
            if self.users == 0:
                self.saved = torch.get_num_threads()
            self.users += 1

    def give_back(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                torch.set_num_threads(self.saved)


_CALLER_THREADS = _CallerThreads()


def _abandoned(worker: CopyWorker) -> None:
    """A started backend collected without stop(): its copy thread ends and its thread hold is given back."""
    worker.stop_soon()
    _CALLER_THREADS.give_back()


class CpuBackend:
    """The Backend on the host: compute on the caller's threads, loads on one copy thread.

    Takes one core from compute for the copy thread while started (compute_threads = cores - 1).
    """
    name = "cpu"
    device = torch.device("cpu")

    def __init__(self, compute_threads: int | None = None):
        self.compute_threads = compute_threads or max(1, usable_cores() - 1)
        self._holds_threads = False
        self._worker: CopyWorker | None = None
        self._abandoned: weakref.finalize | None = None
        self._inline_marks = np.zeros(3)

    def start(self) -> None:
        """Start the copy thread and set torch's intra-op threads to compute_threads (process-wide).

        Raises what thread creation raises, after giving the caller's thread count back.
        """
        if not self._holds_threads:
            _CALLER_THREADS.hold()
            self._holds_threads = True
        # The copy worker needs the GIL only to publish a finished ticket; measured on tiny's streamed plan
        # (3 interleaved rounds), a 0.2 ms interpreter switch interval instead of the default 5 ms changed
        # neither ms/frame (48-53 vs 43-51) nor stalls (~3 ms), so the default is kept.
        # One core for the copy thread: measured on 2-core machines, copy beside 1-thread compute took
        # 0.99x the longer of the two; with compute on both cores, 1.25x (ARCHITECTURE.md).
        # The copy thread runs its copies on one thread: OpenMP gives a new thread the default team size
        # (every core), whose spinning workers would take the compute thread's core.
        try:
            worker = CopyWorker(lambda recipe, _ticket: execute_on_host(recipe), "residency-copy",
                                on_start=lambda: torch.set_num_threads(1))
            worker.start()
        except BaseException:  # no thread: the caller's count comes back now, not at a stop() never called
            self.stop()
            raise
        self._worker = worker
        # A backend dropped while started (a model attached, then let go of without detach) ends its copy thread
        # and gives the thread count back when collected: they stayed for the process's life, and every later
        # runtime's detach left torch at the dropped one's count
        self._abandoned = weakref.finalize(self, _abandoned, worker)
        # After the worker's call: set_num_threads also sets process-wide BLAS threads, so compute's wins.
        torch.set_num_threads(self.compute_threads)

    def stop(self) -> None:
        """Stop the copy thread and give the caller's torch thread count back; safe to call twice."""
        if self._abandoned is not None:
            self._abandoned.detach()
            self._abandoned = None
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        if self._holds_threads:
            _CALLER_THREADS.give_back()
            self._holds_threads = False

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 host tensor of `nbytes` bytes (uninitialised)."""
        return torch.empty(int(nbytes), dtype=torch.uint8)

    def unpack_staging_bytes(self, largest_unpacked_blob_bytes: int) -> int:
        """0 bytes: the copy thread unpacks straight from the host blob."""
        return 0  # the worker unpacks straight from the host blob

    def make_recipe(self, label: str, blob: torch.Tensor, dst: torch.Tensor | None,
                    unpacks: list[tuple[StorageFormat, int, int, torch.Tensor]], plain_unpacks: int) -> LoadRecipe:
        """A load of `blob`: copied whole into `dst`, or unpacked per (format, offset, nbytes, view)."""
        if dst is not None:
            return LoadRecipe(label, blob.numel(), blob, dst[:blob.numel()])
        views = tuple((fmt, blob[off:off + n], out) for fmt, off, n, out in unpacks)
        # only the plain tensors are copied: the unpacks read the rest from the host blob (costs.copy_bytes)
        copied = sum(n for _, _, n, _ in unpacks[:plain_unpacks])
        return LoadRecipe(label, copied, None, None, views, plain_unpacks)

    def submit(self, recipe: LoadRecipe) -> int:
        # Compute is synchronous on the CPU: everything issued before this call has finished, so the
        # load may overwrite its destination at once.
        """Queue a load on the copy thread; returns its ticket (> 0)."""
        return self._worker.submit(recipe)

    def wait(self, ticket: int) -> None:
        """Block the host until the ticket's load finished; raises the load's error if it failed."""
        self._worker.wait(ticket)

    def run_now(self, recipe: LoadRecipe) -> None:
        """Load synchronously on the calling thread; its marks become those of ticket 0."""
        self._inline_marks[:] = execute_on_host(recipe)

    def drain(self) -> None:
        """Wait until every queued load finished; raises a failed load's error."""
        if self._worker is not None:
            self._worker.drain()

    def settle(self) -> None:
        """As drain, for detach: a failed load's error already raised to its waiter is not raised again."""
        if self._worker is not None:
            self._worker.settle()

    def clock(self) -> float:
        """time.perf_counter() in seconds."""
        return time.perf_counter()

    def copy_marks(self, ticket: int) -> tuple[float, float, float]:
        """(start, copied, end) perf_counter seconds of a ticket's load; ticket <= 0: the last run_now."""
        if ticket <= 0:  # a synchronous load: its marks are the last inline ones
            m = self._inline_marks
        else:
            m = self._worker.marks[ticket % MARK_RING]
        return float(m[0]), float(m[1]), float(m[2])

    def resolve(self, marks: np.ndarray) -> np.ndarray:
        """`marks` unchanged: they are perf_counter seconds already."""
        return marks  # perf_counter seconds already
