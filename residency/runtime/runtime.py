"""Runtime(plan, backend).attach(pipeline): the pipeline runs under the plan until detach() restores it.

Owns the ledger and the host store across re-attaches; recovers a step from out-of-memory by re-planning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from residency.errors import ResidencyError
from residency.plan import Plan
from residency.runtime.backend import Backend, get_backend
from residency.runtime.device_memory import TORCH_DTYPES, DeviceMemory
from residency.runtime.executor import Executor
from residency.runtime.hooks import ModelHook, add_hook, check_removable, remove_hook
from residency.runtime.host_store import HostStore, block_tensor
from residency.runtime.ledger import DeviceBudgetExceeded, Ledger
from residency.runtime.recovery import MAX_RECOVERIES, recovery_budget, restore, take_snapshot
from residency.runtime.schedule import CallSchedule
from residency.telemetry.recorder import Recorder, TelemetrySnapshot
from residency.workload import Workload

ReplanFn = Callable[[int], Plan]  # budget bytes -> a plan for that budget


class _BlockHook(ModelHook):
    def __init__(self, executor: Executor, name: str):
        self.executor, self.name = executor, name

    def pre_forward(self, module, args, kwargs) -> None:
        self.executor.before(self.name)

    def post_forward(self, module, output) -> None:
        self.executor.after(self.name)


class Runtime:
    def __init__(self, plan: Plan, backend: str | Backend | None = "cpu", workload: Workload | None = None,
                 replan: ReplanFn | None = None, host_budget_bytes: int | None = None, protect_kv: bool = True):
        if workload is None:
            raise ResidencyError("the runtime needs the workload the plan was made for",
                                 hint="pass workload=… (e.g. the catalog entry of the pipeline's config)")
        plan.check_matches(workload, f"workload {workload.name!r}")
        self.plan, self.workload, self.replan = plan, workload, replan
        self.backend = get_backend(backend)
        self.ledger = Ledger(plan.budget.vram_bytes)
        self.host_budget_bytes = host_budget_bytes
        self.protect_kv = protect_kv
        self.recoveries: list[tuple[str, int]] = []  # (cause, new budget bytes) per recovery
        self.recorder = Recorder([bp.name for bp in plan.blocks], plan.prediction)
        self.pipeline: nn.Module | None = None
        self._executor: Executor | None = None
        self._memory: DeviceMemory | None = None
        self._originals: dict[str, tuple[tuple[torch.Tensor, torch.Tensor], ...]] = {}
        self._buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
        self.store: HostStore | None = None

    # --- attach / detach ---
    def attach(self, pipeline: nn.Module) -> Runtime:
        if self.pipeline is not None:
            raise ResidencyError("this runtime is already attached", hint="detach() it first")
        self._attach(pipeline, self.plan)
        return self

    def _modules(self, pipeline: nn.Module) -> dict[str, nn.Module]:
        blocks = pipeline.blocks()
        names = [n for n, _, _ in blocks]
        if names != [b.name for b in self.workload.blocks]:
            raise ResidencyError(f"the pipeline's blocks do not match workload {self.workload.name!r}",
                                 hint="build the workload from this pipeline's config")
        return {n: m for n, m, _ in blocks}

    def _attach(self, pipeline: nn.Module, plan: Plan) -> None:
        plan.check_matches(self.workload, f"workload {self.workload.name!r}")
        modules = self._modules(pipeline)
        tensors = {b.name: tuple(block_tensor(modules[b.name], n) for n, _ in b.tensors) for b in self.workload.blocks}
        for bp in plan.blocks:
            for t in tensors[bp.name]:
                if t.dtype != TORCH_DTYPES[bp.compute_dtype]:
                    raise ResidencyError(
                        f"block {bp.name} computes in {bp.compute_dtype} but the pipeline holds {t.dtype} "
                        "weights (activations follow the pipeline's dtype)",
                        hint="build the pipeline in the plan's compute dtype, or plan for the pipeline's")
                if t.device.type != "cpu":
                    raise ResidencyError(f"block {bp.name} has weights on {t.device}; the runtime places them",
                                         hint="build or load the pipeline on the CPU before attaching")
        self.store = HostStore(self.workload.fingerprint())
        on_cpu = self.backend.device.type == "cpu"
        # The CPU backend's device memory is RAM too: what the plan predicts it will hold at its peak
        # (the budget is only a ceiling, often most of the RAM, and counting it twice refused every run).
        device_in_ram = 0
        if on_cpu:
            device_in_ram = plan.prediction.peak_total_bytes if plan.prediction else self.ledger.budget_bytes
        self.store.build([(bp.name, modules[bp.name], self.workload.by_name[bp.name], bp.format,
                           {n: t.detach() for (n, _), t in zip(self.workload.by_name[bp.name].tensors,
                                                            tensors[bp.name], strict=True)})
                          for bp in plan.blocks],
                         extra_host_bytes=device_in_ram,
                         host_budget_bytes=self.host_budget_bytes)
        self.backend.start()
        memory = None
        originals = {name: tuple((t, t.data) for t in ts) for name, ts in tensors.items()}
        try:
            memory = DeviceMemory(self.backend, self.ledger, self.workload, plan, self.store.blobs)
            executor = Executor(plan, CallSchedule(self.workload, plan), memory, self.backend, self.ledger,
                                self.recorder, tensors)
        except BaseException:
            for pairs in originals.values():
                for t, data in pairs:
                    t.data = data
            if memory is not None:
                memory.release()
            self.backend.stop()
            raise
        self._originals, self._memory, self._executor = originals, memory, executor
        self.plan, self.pipeline = plan, pipeline
        if not on_cpu:
            self._move_buffers(modules)
        for name, module in modules.items():
            add_hook(module, _BlockHook(executor, name))

    def _move_buffers(self, modules: dict[str, nn.Module]) -> None:
        """Buffers the workload does not list (non-persistent, e.g. position tables) follow to the device."""
        for module in modules.values():
            for sub in module.modules():
                for key, buf in list(sub._buffers.items()):
                    if buf is not None and buf.device != self.backend.device:
                        moved = buf.to(self.backend.device)
                        self.ledger.reserve("resident", moved.numel() * moved.element_size(), "buffers")
                        self._buffers.append((sub, key, buf))
                        sub._buffers[key] = moved

    def detach(self) -> None:
        """Restore the pipeline exactly: original weight storages, devices, no hook left."""
        if self.pipeline is None:
            return
        modules = self._modules(self.pipeline).values()
        for module in modules:  # before anything changes: a detach that cannot finish changes nothing
            check_removable(module)
        self._executor.close_frame()
        self._executor.stop()
        for module in modules:
            remove_hook(module)
        for pairs in self._originals.values():
            for t, data in pairs:
                t.data = data
        for sub, key, buf in self._buffers:
            moved = sub._buffers[key]
            self.ledger.release("resident", moved.numel() * moved.element_size())
            sub._buffers[key] = buf
        self._buffers.clear()
        self._originals = {}
        self._memory.release()
        self.backend.stop()
        self.pipeline, self._executor, self._memory = None, None, None

    # --- running ---
    def set_budget(self, budget_bytes: int) -> None:
        """Another program took (or returned) device memory; a cut below use triggers recovery in step()."""
        self.ledger.set_budget(budget_bytes)

    def _account_kv(self, session) -> None:
        """Hold the session's real KV bytes instead of the workload's figure (a different dtype or window)."""
        nbytes = session.cache.nbytes
        held = self._memory.reserved["kv_cache"]
        if nbytes != held:
            self.ledger.release("kv_cache", held)
            self._memory.reserved["kv_cache"] = 0
            self.ledger.reserve("kv_cache", nbytes, "the session's KV cache")
            self._memory.reserved["kv_cache"] = nbytes

    def step(self, session, action: Any):
        """session.step(action), recovering from out-of-memory: restore, re-plan, re-attach, retry."""
        if self.pipeline is None:
            raise ResidencyError("the runtime is not attached", hint="attach(pipeline) first")
        snap = take_snapshot(session, self.protect_kv)
        for attempt in range(MAX_RECOVERIES + 1):
            try:
                self._account_kv(session)
                self.ledger.check()
                return session.step(action)
            except (torch.OutOfMemoryError, DeviceBudgetExceeded) as e:
                restore(session, snap)
                if self.replan is None or attempt == MAX_RECOVERIES:
                    raise
                self._recover(e)
        raise AssertionError("unreachable")

    def _recover(self, cause: BaseException) -> None:
        budget = recovery_budget(cause, self.ledger.budget_bytes, self.ledger.total_bytes, self.backend.device)
        pipeline = self.pipeline
        self.detach()
        self.ledger.set_budget(budget)
        plan = self.replan(budget)
        try:
            self._attach(pipeline, plan)
        except DeviceBudgetExceeded as e:
            raise DeviceBudgetExceeded(f"no plan fits the device memory left ({budget} bytes): {e.message}",
                                       hint="free device memory, or use smaller formats / fewer context frames"
                                       ) from cause
        self.recoveries.append((type(cause).__name__, budget))

    # --- observation ---
    def telemetry(self) -> TelemetrySnapshot:
        """An immutable snapshot of the recorded frames (the open frame is not included)."""
        return self.recorder.snapshot(self.ledger.snapshot().current_bytes)

    @property
    def executor_stats(self) -> dict[str, int]:
        e = self._executor
        return {"resyncs": e.resyncs, "out_of_schedule_calls": e.out_of_schedule_calls} if e else {}
