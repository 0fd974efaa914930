"""The CUDA/ROCm backend: a copy stream fed by a worker thread through a small pinned staging ring.

Cross-stream order is kept with events only (wait_event/record_stream); the compute thread never syncs.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch.utils import _pytree as pytree

from residency.formats.base import StorageFormat
from residency.runtime.backend import LoadRecipe
from residency.runtime.copy_worker import MARK_RING, CopyWorker

STAGING_BUFFERS = 2  # pinned host buffers: one filled by the host while the other is in flight
STAGING_BYTES = 32 * 2**20  # per buffer; host RAM pinned in total = 64 MiB, never the whole model
EVENT_POOL = 16384  # timing events, recycled; a frame records far fewer (read once per frame)
TICKET_EVENTS = 256  # ready/after events per ticket slot; more than the loads ever in flight
# The copy worker thread syncs on events while a block is being captured: "thread_local" lets it, and still
# refuses a host synchronisation on the capturing thread (a block that syncs then falls back to eager).
GRAPH_CAPTURE_ERROR_MODE = "thread_local"


class CudaGraphCapture:
    """The GraphCapture of residency.runtime.graphed on CUDA/ROCm: warm-up on a side stream, then
    torch.cuda.graph capture into one memory pool (graph_pool_handle) shared by every graph of an attach.

    The graphs of one pool never run at once (all replay on the compute stream) and hand nothing out of the
    pool (results go to static buffers allocated outside it), so they may share its memory in any order.
    Cost: torch.cuda.graph synchronises the device and empties the device and pinned-host caches once per
    capture (recent torch collects garbage there only under torch.compiler.config.force_cudagraph_gc).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream(device)

    def warm_up(self, fn, args: tuple):
        """fn(*args) on the side stream, ordered after the compute issued so far and before what follows
        (the executor's refill of the slot fn read records its event on the compute stream after this)."""
        compute = torch.cuda.current_stream(self.device)
        self.side.wait_stream(compute)
        try:
            with torch.cuda.stream(self.side):
                result = fn(*args)
        finally:  # also when fn raises: what it issued may still read the slot a refill would overwrite
            compute.wait_stream(self.side)
        for t in pytree.tree_leaves(result):
            if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                t.record_stream(compute)  # made on the side stream, read and freed on the compute stream
        return result

    def capture(self, fn, static_args: tuple):
        """Capture fn(*static_args) (nothing runs); returns the graph's replay, issued on the current stream.

        Raises torch's error for what a graph cannot hold (a host synchronisation: capture_error_mode)."""
        graph = torch.cuda.CUDAGraph()
        # Hazard: when a capture fails (a host sync invalidates it), torch.cuda.graph.__exit__ raises from
        # capture_end() before it exits its own stream context, so the caller would stay on the side stream,
        # outside the copy stream's event order. This outer context restores the caller's stream either way.
        with torch.cuda.stream(self.side), torch.cuda.graph(graph, pool=self.pool, stream=self.side,
                                                            capture_error_mode=GRAPH_CAPTURE_ERROR_MODE):
            fn(*static_args)
        return graph.replay


class CudaBackend:
    """The Backend on a CUDA or ROCm device: loads on a copy stream fed by a worker thread.

    Pins 2 x 32 MiB of host RAM as a staging ring while started, never the whole model.
    """
    compute_threads = 0

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device or "cuda")
        # ROCm builds of torch expose HIP through torch.cuda; torch.version.hip tells them apart.
        self.name = "rocm" if torch.version.hip else "cuda"
        self._worker: CopyWorker | None = None
        self._lock = threading.Lock()
        self._next_event = 0

    # --- lifecycle ---
    def start(self) -> None:
        """Create the copy stream, the pinned staging ring, timing events and the copy worker.

        Raises torch's error when the device or pinned memory is unavailable.
        """
        self.compute_stream = torch.cuda.current_stream(self.device)
        self.copy_stream = torch.cuda.Stream(self.device)
        self._pinned = [torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(STAGING_BUFFERS)]
        # Recorded on the copy stream after the h2d that last read each pinned buffer.
        self._pinned_free = [torch.cuda.Event() for _ in range(STAGING_BUFFERS)]
        self._next_pinned = 0
        # after[i]: recorded on the compute stream at submit; ready[i]: on the copy stream when loaded.
        self._after = [torch.cuda.Event() for _ in range(TICKET_EVENTS)]
        self._ready = [torch.cuda.Event() for _ in range(TICKET_EVENTS)]
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(EVENT_POOL)]
        self._epoch = torch.cuda.Event(enable_timing=True)
        self._epoch.record(self.compute_stream)
        self._inline_marks = (0.0, 0.0, 0.0)
        self._worker = CopyWorker(self._execute, "residency-copy-stream")
        self._worker.start()

    def stop(self) -> None:
        """Stop the copy worker, then synchronise the device so no copy is in flight; safe twice."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
            # Detach is not a hot path: one device sync so no copy is in flight when buffers are freed.
            torch.cuda.synchronize(self.device)

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 device buffer of `nbytes` bytes, recorded on the copy stream.

        Raises torch.OutOfMemoryError when the device is full.
        """
        buf = torch.empty(int(nbytes), dtype=torch.uint8, device=self.device)
        # The copy stream writes every device buffer the runtime owns; without record_stream the
        # caching allocator could hand the memory to another tensor while a copy still targets it.
        buf.record_stream(self.copy_stream)
        return buf

    def graph_capture(self) -> CudaGraphCapture:
        """A graph capture for one attach's graphed blocks (residency.runtime.graphed), with its own pool."""
        return CudaGraphCapture(self.device)

    def unpack_staging_bytes(self, largest_unpacked_blob_bytes: int) -> int:
        """`largest_unpacked_blob_bytes`: packed blobs land in device staging, then unpack there."""
        return largest_unpacked_blob_bytes  # packed bytes land here, then unpack on the copy stream

    def set_unpack_staging(self, buf: torch.Tensor) -> None:
        """Use `buf` (device bytes, at least unpack_staging_bytes) as the staging area for unpacked loads."""
        self._staging = buf

    def make_recipe(self, label: str, blob: torch.Tensor, dst: torch.Tensor | None,
                    unpacks: list[tuple[StorageFormat, int, int, torch.Tensor]], plain_unpacks: int) -> LoadRecipe:
        """A load of `blob`: copied whole into `dst`, or staged, then unpacked per (format, offset, n, view).

        The unpacked form needs set_unpack_staging first (AttributeError otherwise).
        """
        n = blob.numel()
        if dst is not None:
            return LoadRecipe(label, n, blob, dst[:n])
        stage = self._staging[:n]
        views = tuple((fmt, stage[off:off + k], out) for fmt, off, k, out in unpacks)
        return LoadRecipe(label, n, blob, stage, views, plain_unpacks)

    # --- the copy engine ---
    def _mark(self, stream: torch.cuda.Stream) -> float:
        with self._lock:
            i = self._next_event
            self._next_event = (i + 1) % EVENT_POOL
        self._events[i].record(stream)
        return float(i)

    def _h2d(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Host blob -> device through the pinned ring, in chunks; runs on the worker thread."""
        s = self.copy_stream
        for start in range(0, src.numel(), STAGING_BYTES):
            n = min(STAGING_BYTES, src.numel() - start)
            k = self._next_pinned
            self._next_pinned = (k + 1) % STAGING_BUFFERS
            # The host must not refill a pinned buffer an async h2d is still reading: wait for the copy
            # stream to pass it. This blocks the copy worker only, never the compute thread.
            self._pinned_free[k].synchronize()
            pinned = self._pinned[k][:n]
            pinned.copy_(src[start:start + n])  # host memcpy (the GIL is released)
            # non_blocking from pinned memory is a true async DMA; from pageable memory it would not be.
            dst[start:start + n].copy_(pinned, non_blocking=True)
            self._pinned_free[k].record(s)

    def _execute(self, recipe: LoadRecipe, ticket: int) -> tuple[float, float, float]:
        s = self.copy_stream
        with torch.cuda.stream(s):
            # Without this wait the copy could overwrite a slot that compute issued earlier still reads.
            s.wait_event(self._after[ticket % TICKET_EVENTS])
            t0 = self._mark(s)
            if recipe.copy_src is not None:
                self._h2d(recipe.copy_src, recipe.copy_dst)
            for fmt, src, out in recipe.unpacks[:recipe.plain_unpacks]:
                fmt.unpack(src, out)
            t1 = self._mark(s)
            for fmt, src, out in recipe.unpacks[recipe.plain_unpacks:]:
                fmt.unpack(src, out)  # temporaries are allocated and freed on the copy stream only
            t2 = self._mark(s)
            self._ready[ticket % TICKET_EVENTS].record(s)
        return t0, t1, t2

    def submit(self, recipe: LoadRecipe) -> int:
        """Queue a load on the copy stream, ordered after all compute issued so far; returns its ticket."""
        ticket = self._worker.next_ticket
        # Recorded before the worker can see the job: orders the load after all compute issued so far.
        self._after[ticket % TICKET_EVENTS].record(self.compute_stream)
        return self._worker.submit(recipe)

    def wait(self, ticket: int) -> None:
        """Make the compute stream wait for a ticket's load; the host waits only until it is issued."""
        self._worker.wait(ticket)  # host: the worker has issued the load (not that it finished)
        # Without wait_event the compute stream could read the slot before the copy lands.
        self.compute_stream.wait_event(self._ready[ticket % TICKET_EVENTS])

    def run_now(self, recipe: LoadRecipe) -> None:
        # Synchronous mode: on the compute stream itself (the accelerate-style blocking copy).
        """Load on the compute stream itself, blocking (copy_mode "sync", resynchronisation)."""
        s = self.compute_stream
        t0 = self._mark(s)
        if recipe.copy_src is not None:
            recipe.copy_dst.copy_(recipe.copy_src)  # pageable source: blocking, as accelerate does
        for fmt, src, out in recipe.unpacks[:recipe.plain_unpacks]:
            fmt.unpack(src, out)
        t1 = self._mark(s)
        for fmt, src, out in recipe.unpacks[recipe.plain_unpacks:]:
            fmt.unpack(src, out)
        self._inline_marks = (t0, t1, self._mark(s))

    def drain(self) -> None:
        """Wait until every load is issued, then order later compute after the copy stream.

        Raises a failed load's error.
        """
        if self._worker is not None:
            self._worker.drain()
            # Later compute-stream work must also come after every copy issued (resynchronisation).
            self.compute_stream.wait_stream(self.copy_stream)

    def settle(self) -> None:
        """As drain, for detach: a failed load's error already raised to its waiter is not raised again."""
        if self._worker is not None:
            self._worker.settle()
            self.compute_stream.wait_stream(self.copy_stream)

    def clock(self) -> float:
        """A compute-stream event mark (an event index, not seconds); resolve() turns it into seconds."""
        return self._mark(self.compute_stream)

    def copy_marks(self, ticket: int) -> tuple[float, float, float]:
        """(start, copied, end) event marks of a ticket's load; ticket <= 0: the last run_now."""
        if ticket <= 0:
            return self._inline_marks
        m = self._worker.marks[ticket % MARK_RING]
        return float(m[0]), float(m[1]), float(m[2])

    def resolve(self, marks: np.ndarray) -> np.ndarray:
        # Once per frame. elapsed_time raises (cudaErrorNotReady) on an event the device has not reached,
        # and the frame's newest mark was recorded a moment ago on the compute stream: wait for it here.
        # Every copy mark of the frame precedes a compute mark (compute waited on its load), so the compute
        # stream alone covers them; the copy stream's prefetches for the next frame are not waited for.
        # Cost: nothing when the frame's output was already read on the host (a world model's step reads it).
        """Event marks -> seconds since start(), same shape.

        Cost: synchronises the compute stream once (call once per frame, after its output is read).
        """
        self.compute_stream.synchronize()
        return np.array([self._epoch.elapsed_time(self._events[int(m)]) * 1e-3 for m in marks.ravel()]
                        ).reshape(marks.shape)
