"""Runtime(plan, backend, workload=…).attach(model): the model runs under the plan until detach() restores it.

Owns the ledger and the host store across re-attaches; a call that runs out of device memory is re-planned
and retried: a call of the model itself, or a session's step (restored first through its snapshot).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from residency.device import DeviceProfile
from residency.errors import ResidencyError
from residency.plan import Budget, Plan
from residency.runtime import block_buffers, weight_readers
from residency.runtime.attached_guards import (
    conversion_guards,
    refuse_inference_parameters,
    state_dict_hooks,
    swaps_weights,
    warn_inference_only,
)
from residency.runtime.backend import Backend
from residency.runtime.backends import get_backend
from residency.runtime.block_calls import BlockCalls, BlockHook, GroupHook, ReaderHook
from residency.runtime.closed_loop import ClosedLoop
from residency.runtime.detaching import Detaching
from residency.runtime.device_memory import DeviceMemory
from residency.runtime.executor import Executor, version_of
from residency.runtime.graphed import BlockForwards, block_forwards, check_block_modes
from residency.runtime.hooks import (
    ForwardWatch,
    add_hook,
    bypass_reads_slot,
    has_hook,
)
from residency.runtime.host_store import BlockBlob, HostStore
from residency.runtime.kv_storage import use_plan_kv_dtype
from residency.runtime.ledger import DeviceBudgetExceeded, Ledger
from residency.runtime.live_sessions import LiveSessions
from residency.runtime.model_watching import ModelWatching
from residency.runtime.module_paths import (
    block_modules,
    block_tensors,
    check_block_formats,
    check_block_tensors,
    check_bound_blocks,
    warn_unplanned,
)
from residency.runtime.not_pickled import NotCopiedRuntime
from residency.runtime.plan_switching import PlanSwitching, check_profile
from residency.runtime.recovering import Recovering, RetryHook
from residency.runtime.retry_safety import CallState, input_names, model_buffers
from residency.runtime.schedule import CallSchedule
from residency.runtime.session_protocol import RecoverableSession
from residency.runtime.structure_watch import StructureWatch, model_label, weak_busy, weak_call
from residency.runtime.swapped_inputs import SwappedInputs
from residency.runtime.weight_edits import WeightWatch
from residency.simulate.memory import peak_bytes
from residency.telemetry.recorder import Recorder, TelemetrySnapshot
from residency.workload import Workload

ReplanFn = Callable[[Budget, DeviceProfile], Plan]  # the budget left and the device's profile -> a plan for them


class Runtime(PlanSwitching, Recovering, ModelWatching, Detaching, NotCopiedRuntime):
    """Executes `plan` on a model through hooks; `attach(model)`, run it as usual, `detach()` (or leave a `with`).

    Attach finds every workload block's module(s) by path (`model.get_submodule`: the paths its BlockSpec
    records, else its name; a `blocks()` method of the model's class overrides them) and hooks them
    (residency.runtime.block_calls: a block of several sibling modules is one call; a block enclosing
    the others, such as the model's own tensors, is not hooked and must be planned resident).
    It also hooks the model's own forward, the unit of recovery: a call of the model that runs out of
    device memory — torch's out-of-memory, or DeviceBudgetExceeded after `set_budget` cut the budget —
    re-plans through `replan(budget, profile)`, re-attaches and calls the model again with the same
    arguments. That retry is exact only for a forward without side effects beyond its output; a stateful
    model runs through `step(session, action)`, which restores the session's snapshot (the
    RecoverableSession protocol) before the retry, and calls inside a step are not retried one by one.
    A call that does not go through the model (a submodule called directly) is not retried.

    `profile` is the DeviceProfile the plan was made for (its fingerprint is checked); replan is called
    with it, and a recalibrated profile may replace `runtime.profile` for later re-plans.

    Threads (CPU backend): while attached, torch's intra-op thread count — process-wide, so every torch
    op of the process runs on it — is `backend.compute_threads` (cores − 1, a core left to the copy
    thread). Detach restores the count found at attach (with several runtimes attached at once, the
    last detach restores the count found by the first attach); a count the caller sets while attached
    is overwritten then. Calls of the model (or steps) from several threads run one at a time, and
    detach and switch_plan wait for the one running; the ledger and the hooks are the driving thread's.
    """

    def __init__(self, plan: Plan, backend: str | Backend | None = "cpu", workload: Workload | None = None,
                 replan: ReplanFn | None = None, profile: DeviceProfile | None = None,
                 host_budget_bytes: int | None = None, protect_kv: bool = True):
        if workload is None:
            raise ResidencyError("the runtime needs the workload the plan was made for",
                                 hint="pass workload=… (e.g. the catalog entry of the pipeline's config)")
        plan.check_matches(workload, f"workload {workload.name!r}")
        if replan is not None:
            if profile is None:
                raise ResidencyError("a replan callable needs the profile the plan was made for",
                                     hint="pass profile=…: the runtime calls replan(budget, profile)")
            check_profile(plan, profile)
        self.plan, self.workload, self.replan, self.profile = plan, workload, replan, profile
        self.backend = get_backend(backend)
        self.ledger = Ledger(plan.budget.vram_bytes)
        self.host_budget_bytes = host_budget_bytes
        self.protect_kv = protect_kv  # the session's snapshot copies the KV slot a step overwrites
        self.recoveries: list[tuple[str, int]] = []  # (cause, new budget bytes) per recovery
        self.recorder = Recorder([bp.name for bp in plan.blocks], plan.prediction)
        self.recorder.eager_close = self.backend.device.type == "cpu"  # marks are seconds: telemetry() closes a done frame
        self._sessions = LiveSessions()  # the sessions stepped, while alive: their KV caches are on the device
        self.plan_started_s = float("-inf")  # set at each attach of a plan (see _attach)
        self.pipeline: nn.Module | None = None
        self._executor: Executor | None = None
        self._calls: BlockCalls | None = None
        self._memory: DeviceMemory | None = None
        self._hooked: list[nn.Module] = []  # block modules carrying a hook, and the modules that read their weights
        self._forwards = ForwardWatch(self._path_of)  # refuses a call once a forward no longer runs the hook
        self._holders: weight_readers.Holders | None = None
        self._root: nn.Module | None = None  # the model, carrying the retry hook
        # for what a failed call changed (retry_safety): the forward's parameter names, the model's buffers
        self._input_names: tuple[str, ...] = ()
        self._model_buffers: list[tuple[str, nn.Module, str]] = []
        self._retrying = False  # a unit of retry is running: calls inside it are not retried on their own
        self._in_unit = False  # a unit of work is running: a call of the model inside a step is part of it
        self._unit_thread = 0  # the thread running it (threading.get_ident): its registrations are the model's
        self._unit_lock = threading.RLock()  # one unit at a time across threads; re-entered by nested calls
        self._swaps = False  # the attached plan swaps weights in: autograd is kept off its calls
        self._swapped_inputs: SwappedInputs | None = None  # refuses a call given one of those weights
        self.loop: ClosedLoop | None = None  # enable_closed_loop() sets it
        self._originals: dict[str, tuple[tuple[torch.Tensor, torch.Tensor], ...]] = {}
        self._buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
        self._counters: dict[int, tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = {}  # _keep_counters
        self.store: HostStore | None = None
        # Called with each call's (args, kwargs) before the model runs: it may refuse a call the plan was
        # not made for (residency.attach refuses inputs of other shapes than the workload's example).
        self.call_check: Callable[[tuple, dict], None] | None = None
        self.notes: list[str] = []  # what the runtime changed of the plan while running (a compile fell back)
        self._kv_config: Any = None  # a world model's config before the plan's KV dtype was set in it (kv_storage)
        self._compiled: BlockForwards | None = None  # `compiled` and `graphed` blocks' forwards, restored at detach
        self._weights: WeightWatch | None = None  # refuses a call after an in-place edit of a block parameter
        self._structure: StructureWatch | None = None  # refuses a call after modules or parameters were added

    def __enter__(self) -> Runtime:
        if self.pipeline is None:  # `with` a detached runtime ran the model plain, silently
            raise ResidencyError("this runtime is not attached (detached, or never attached)",
                                 hint="attach again: `with residency.attach(model, …) as rt:` or rt.attach(model)")
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the attached model: `with residency.attach(model, …) as rt: rt(x)` is `model(x)` (a pipeline's
        handle is called so; here it was a TypeError)."""
        if self._root is None:
            raise ResidencyError("the runtime is not attached: there is no model to call",
                                 hint="call the model itself, or attach it first")
        return self._root(*args, **kwargs)

    # --- attach / detach ---
    def attach(self, pipeline: nn.Module) -> Runtime:
        """Pack the model's block weights into host blobs, reserve device memory and hook the blocks.

        Returns self. Raises ResidencyError when already attached, when the model is attached elsewhere,
        or when its blocks do not match the workload or plan (dtype, device, tensors); HostMemoryExceeded
        when the blobs do not fit in RAM; DeviceBudgetExceeded when the plan's memory passes the budget.
        Cost: copies every block's weights once into host blobs.
        """
        if self.pipeline is not None:
            raise ResidencyError("this runtime is already attached", hint="detach() it first")
        if has_hook(pipeline):
            raise ResidencyError("the model is attached to another runtime", hint="detach() that one first (residency.detach(model), without it at hand)")
        self._holders = None  # modules outside the blocks that hold their parameters: looked for once per attach
        self._counters = {}  # a failed attach's snapshot is not this one's
        with torch.inference_mode(False):  # device memory must be plain tensors: the copy thread writes them
            self._attach_within_budget(pipeline)
        try:
            add_hook(pipeline, RetryHook(self))
        except BaseException:
            self._detach_blocks()
            self._forget_stores()
            raise
        self._root = pipeline
        try:
            self._use_plan_kv_dtype()
        except BaseException:  # a config that refuses the plan's KV dtype: the model is left as it was
            self._detach()
            raise
        self._input_names, self._model_buffers = input_names(pipeline), model_buffers(pipeline)
        self._structure = StructureWatch(pipeline, model_label(pipeline), weak_busy(self, "_running_here"),
                                         weak_call(self, "_arm_outside_check"))
        return self

    def _use_plan_kv_dtype(self) -> None:
        """Sessions started from now store their KV cache in the plan's dtype (runtime.kv_storage); the user's
        config is kept for detach."""
        if not self.workload.kv_cache_bytes():  # no KV cache planned: a config's own kv_dtype field is not ours
            return
        replaced = use_plan_kv_dtype(self._root, self.plan)
        if self._kv_config is None:
            self._kv_config = replaced

    def _blob_requests(self, plan: Plan, found: dict[str, tuple[nn.Module, ...]],
                       tensors: dict[str, tuple[torch.Tensor, ...]]) -> list[tuple]:
        """What HostStore.build packs, per block: (name, module, spec, format, original tensors by name)."""
        requests = []
        for bp in plan.blocks:
            spec = self.workload.by_name[bp.name]
            names = [tensor_name for tensor_name, _shape in spec.tensors]
            originals = {n: t.detach() for n, t in zip(names, tensors[bp.name], strict=True)}
            module = found[bp.name][0]  # the host store caches a block's blob on its (first) module
            requests.append((bp.name, module, spec, bp.format, originals))
        return requests

    def _attach(self, pipeline: nn.Module, plan: Plan,
                ready: dict[tuple[str, str], BlockBlob] | None = None) -> None:
        plan.check_matches(self.workload, f"workload {self.workload.name!r}")
        found, enclosing = block_modules(pipeline, self.workload)
        check_bound_blocks(plan, self.workload, enclosing)
        check_block_modes(plan, self.backend, enclosing)
        warn_unplanned(pipeline, found, self.workload)
        # one module object under two paths of a block (`self.last = self.layers[-1]`) is hooked once
        modules = {n: tuple({id(m): m for m in mods}.values()) for n, mods in found.items() if n not in enclosing}
        hooked = [m for mods in modules.values() for m in mods]
        if any(has_hook(m) for m in hooked):
            raise ResidencyError("the model's blocks are attached to another runtime", hint="detach() that one first (residency.detach(model), without it at hand)")
        check_block_formats(plan)
        tensors = block_tensors(pipeline, self.workload, found)
        check_block_tensors(plan, self.workload, tensors)
        refuse_inference_parameters(pipeline)
        self.store = HostStore(self.workload.fingerprint())
        on_cpu = self.backend.device.type == "cpu"
        # The CPU backend's device memory is RAM too: what the plan predicts it will hold at its peak
        # (the budget is only a ceiling, often most of the RAM, and counting it twice refused every run).
        device_in_ram = 0
        if on_cpu:
            # a plan without a prediction (a loaded one, edited, its profile not known here): its peak computed as
            # the CPU runtime holds it; the budget stood in, and a 20 GiB budget refused a 28 MiB model for RAM
            device_in_ram = plan.prediction.peak_total_bytes if plan.prediction else sum(
                v for k, v in peak_bytes(self.workload, plan, None).items() if k != "reserve")
        try:  # a failed attach leaves nothing cached: a later edit of the weights must be packed again
            self.store.build(self._blob_requests(plan, found, tensors), extra_host_bytes=device_in_ram,
                             ready=ready, host_budget_bytes=self.host_budget_bytes)
        except BaseException:
            self.store.release()
            raise
        self.backend.start()
        memory = None
        originals = {name: tuple((t, t.data) for t in ts) for name, ts in tensors.items()}
        try:
            memory = DeviceMemory(self.backend, self.ledger, self.workload, plan, self.store.blobs)
            executor = Executor(plan, CallSchedule(self.workload, plan), memory, self.backend, self.ledger,
                                self.recorder, tensors,
                                homes={name: tuple(data for _, data in pairs) for name, pairs in originals.items()})
            versions = {name: tuple(version_of(ts[i]) for i in executor.buffer_index[name])
                        for name, ts in tensors.items()}
        except BaseException:
            for pairs in originals.values():
                for t, data in pairs:
                    t.data = data
            if memory is not None:
                memory.release()
            self.backend.stop()
            self.store.release()
            raise
        self._originals, self._memory, self._executor = originals, memory, executor
        self._swapped_inputs = SwappedInputs((*memory.slots, memory.scratch, memory.arena), self.workload, tensors,
                                             executor.volatile, executor.buffer_index)
        executor.frame_base = self.recorder.last_frame  # a re-attach (switch, recovery): numbers continue
        executor.keep_write = self._keep_buffer_write
        self._buffer_versions = versions
        self._weights = WeightWatch(self.workload, tensors, executor.buffer_index,
                                    {name: tuple(data for _, data in pairs) for name, pairs in originals.items()},
                                    executor.views)
        self.plan, self.pipeline, self._hooked, self._compiled, self._state_hooks = plan, pipeline, [], None, []
        if self._root is pipeline:  # a switch or recovery: the first attach sets it once the attach is whole
            self._use_plan_kv_dtype()
        # where the frames of this plan start on the telemetry's clock: a calibration fits only those (a
        # switch_plan or a recovery records no closed-loop event, and fitting the old plan's frames to the new
        # plan mixed two plans' timings)
        self.plan_started_s = self.clock_s()
        self._swaps = swaps_weights(plan)  # per attached plan: a recovery or switch attaches again
        if not on_cpu:
            self._move_buffers(hooked)
        else:
            self._keep_counters(hooked)
        self._calls = calls = BlockCalls(executor, enclosing, self._unit_lock)
        calls.no_autograd = self._swaps
        try:  # a failure from here on undoes the attach: a model left half hooked could not be attached again
            self._compiled = block_forwards(plan, modules, self.notes, self.backend)  # beneath the hooks
            for name, mods in modules.items():
                for module in mods:
                    add_hook(module, BlockHook(calls, name) if len(mods) == 1 else GroupHook(calls, name))
                    self._hooked.append(module)
                    if name in executor.volatile and bypass_reads_slot(module):
                        self._forwards.add(module)
            # holders: readers of volatile blocks' weights, and on a GPU (weights rebound to device copies) modules
            # whose state_dict() must give the originals; a CPU plan of resident blocks only needs none
            if self._holders is None and (executor.volatile or not on_cpu):
                self._holders = weight_readers.scan_holders(modules, tensors)
            inner, outer = weight_readers.readers(modules, executor.volatile, self._holders or ())
            for readers, inside in ((inner, True), (outer, False)):
                for name, mods in readers.items():
                    for module in mods:
                        if not has_hook(module):  # hooked: a block of a model attached inside this one, its own
                            add_hook(module, ReaderHook(calls, name, inside))
                            self._hooked.append(module)
                            if not inside:  # inside a block, the block's own call has loaded the weights
                                self._forwards.add(module)
            # a block call outside any unit (pipe(...)) checks what a unit's start does, once there is something to
            # check: watched forwards, or what was added (a re-attach, switch or recovery, keeps the watch's record)
            structure = self._structure
            armed = self._forwards.watching or (structure is not None and structure.added)
            calls.outside_unit = self._outside_unit_check if armed else None
            holders = (h for h, _ in self._holders or ())  # outside the model: their state_dict() too
            self._state_hooks = [*state_dict_hooks(pipeline, originals, holders), *conversion_guards(pipeline)]
        except BaseException:
            self._detach_blocks(checked=False)
            self._forget_stores()
            raise

    def _move_buffers(self, modules: list[nn.Module]) -> None:
        """Buffers the workload does not list (non-persistent, e.g. position tables) follow to the device."""
        for module in modules:
            for sub in module.modules():
                for key, buf in list(sub._buffers.items()):
                    if buf is not None and buf.device != self.backend.device:
                        moved = buf.to(self.backend.device)
                        self.ledger.reserve("resident", moved.numel() * moved.element_size(), "buffers")
                        self._buffers.append((sub, key, buf))
                        sub._buffers[key] = moved

    def _keep_counters(self, modules: list[nn.Module]) -> None:
        """The CPU's twin of _move_buffers for a batch norm's num_batches_tracked: a GPU computes on device copies
        of it and detach puts the original back, as it does the norm's running statistics (which the runtime does
        not keep: batch norm writes them without bumping their version counters); on the CPU the counter advanced
        in place and its statistics did not. A copy of each (a scalar) at the first attach, written back when the
        model's hook goes (detach, let-go), not at a switch or recovery (a session goes on through those). Other
        integer buffers are a model's own state, kept as its float buffers' writes are."""
        for module in modules:
            for sub in module.modules():
                buf = sub._buffers.get("num_batches_tracked") if isinstance(sub, nn.modules.batchnorm._BatchNorm) \
                    else None
                if buf is not None and sub.track_running_stats:
                    self._counters.setdefault(id(buf), (sub, "num_batches_tracked", buf, buf.clone()))

    def _keep_buffer_write(self, name: str, index: int, bound: torch.Tensor, binding) -> None:
        """The executor's keep_write: block_buffers.keep_write into this attach's blob and original tensor."""
        block_buffers.keep_write(self.store.blobs[name], self._originals[name][index][1], index, bound, binding)

    # --- running ---
    def _account_kv(self, session: RecoverableSession) -> None:
        """Hold the live sessions' real KV bytes instead of the workload's figure (a different dtype or window, or
        more than one session alive: residency.runtime.live_sessions)."""
        nbytes, count = self._sessions.kv_bytes(session, session.kv_cache_bytes)
        held = self._memory.reserved["kv_cache"]
        if nbytes != held:
            self.ledger.release("kv_cache", held)
            try:
                self.ledger.reserve("kv_cache", nbytes, "the session's KV cache" if count == 1 else
                                    f"the KV caches of {count} live sessions (the plan counted one)")
            except DeviceBudgetExceeded as e:
                self.ledger.reserve("kv_cache", held)  # as it was: it fitted
                if count == 1:
                    raise
                raise DeviceBudgetExceeded(e.message, hint="let go of the sessions you no longer step (del them), "
                                           "or attach with a budget for every session's KV cache") from e
            self._memory.reserved["kv_cache"] = nbytes

    def _autograd_guard(self):
        """torch.no_grad() (with the warning) when autograd is on and the running plan swaps weights in; else
        nothing."""
        if self._swaps and torch.is_grad_enabled():
            warn_inference_only()
            return torch.no_grad()
        return contextlib.nullcontext()

    def step(self, session: RecoverableSession, action: Any):
        """session.step(action), recovering from out-of-memory: restore, re-plan, re-attach, retry.

        Cost: the session's snapshot per step (the world model's: one KV slot when the window is full)."""
        if self.pipeline is None:
            raise ResidencyError("the runtime is not attached", hint="attach(pipeline) first")
        if not all(callable(getattr(session, m, None)) for m in ("snapshot", "restore", "step")):
            raise ResidencyError(f"step() takes a session, got {type(session).__name__}",
                                 hint="start one with pipe.start(image, seed=…) and pass it: runtime.step(session, action)")
        snap = session.snapshot(self.protect_kv)
        with torch.no_grad():  # a rollout never trains: no graph, and no InferenceOnlyWarning on every step
            return self._unit(self._step_once, (session, action), {}, lambda: session.restore(snap))

    def _step_once(self, session: RecoverableSession, action: Any):
        self._account_kv(session)
        self.ledger.check()
        kv = getattr(session, "kv_frames", None)
        self.recorder.kv_frames = kv if isinstance(kv, int) and not isinstance(kv, bool) else None
        try:
            return self._closing(session.step, (action,), {})
        finally:
            self.recorder.kv_frames = None

    def _model_call(self, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return self._closing(forward, args, kwargs, model_call=True)

    def _closing(self, call: Callable[..., Any], args: tuple, kwargs: dict, model_call: bool = False) -> Any:
        """call(*args, **kwargs) as one unit of work, then the last block call still open ends with it.

        `model_call`: a call of the model, whose enclosing blocks take their place first. The outermost unit's
        start and end go to the recorder as clock marks (GPU: two events, resolved at frame end; no sync).
        """
        outer = not self._in_unit
        if outer:
            self._check_unchanged()
        try:  # the unit's flag is set inside: a Ctrl-C just after it left every later call an inner one, unchecked
            if outer:
                self._in_unit, self._unit_thread = True, threading.get_ident()
                self.recorder.unit_start(self.backend.clock())
            if model_call and self._calls is not None:
                self._calls.start()
            out = call(*args, **kwargs)
        except BaseException:
            if self._calls is not None:
                self._calls.discard()
            if outer:
                self.recorder.unit_discard()
                if self._executor is not None:  # a Ctrl-C may have cut the runtime's own bookkeeping short
                    try:
                        self._executor.resettle()
                    except BaseException:  # noqa: BLE001 — the call's own error (an OOM to recover from) is raised,
                        pass               # not a second one met while settling (a load that failed, a 2nd Ctrl-C)
            raise
        finally:
            if outer:
                self._in_unit = False
        if self._calls is not None:  # None: detached during the call
            self._calls.close()
            if outer:
                self.recorder.unit_end(self.backend.clock())
                if self._weights is not None:  # what the model's own forward did in place (max_norm's renorm)
                    self._weights.rebase()     # is no edit: only changes between calls are refused
        elif outer:
            self.recorder.unit_discard()  # its start was marked on a backend that has stopped since
        return out

    def _unit(self, call: Callable[..., Any], args: tuple, kwargs: dict,
              undo: Callable[[], None] | None = None, state: Callable[[], CallState] | None = None) -> Any:
        """One unit of work (a step, a top-level call of the model) with the closed loop around it, if enabled:
        before it a finished re-plan may be switched to; after it the loop reads the frames it closed.

        Units from several threads run one at a time (the lock): blocks share slots, the copy ring and the
        ledger, and two calls interleaved read each other's weights (56 of 60 outputs wrong from 3 threads)."""
        with self._unit_lock:
            if self.pipeline is None and call == self._model_call:  # detached while this call waited: run it plain
                forward, call_args, call_kwargs = args
                return forward(*call_args, **call_kwargs)
            loop = None if self._retrying else self.loop  # a call of the model inside a step is part of the step
            if loop is not None:
                loop.before_unit()
            out = self._retry(call, args, kwargs, undo, state)
            if loop is not None:
                loop.after_unit()
            return out

    # --- observation ---
    def telemetry(self) -> TelemetrySnapshot:
        """An immutable snapshot of the recorded frames. On the CPU backend a frame whose calls are all done (the last
        call or step returned at a frame boundary) is closed for it, its gap filled in when the next unit starts; a
        GPU's frame closes at the next frame's first call (its marks are events: reading them now would wait)."""
        executor = self._executor
        # only the thread that ran the last unit, between units: the recorder is not thread-safe, and another thread
        # (a monitor reading while the model runs) gets the closed frames only, as before
        if (executor is not None and not self._in_unit and self._unit_thread == threading.get_ident()
                and self._unit_lock.acquire(blocking=False)):
            try:
                executor.close_frame_if_done()
            finally:
                self._unit_lock.release()
        return self.recorder.snapshot(self.ledger.snapshot().current_bytes)

    @property
    def executor_stats(self) -> dict[str, int]:
        """Counts of calls that left the schedule: {"resyncs", "out_of_schedule_calls"}; {} detached."""
        e = self._executor
        return {"resyncs": e.resyncs, "out_of_schedule_calls": e.out_of_schedule_calls} if e else {}
