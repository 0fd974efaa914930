"""The per-call engine behind the hooks: follows the schedule, rotates streamed blocks through the slots,
loads and evicts phase blocks, binds parameters to device memory, and records telemetry.

Per call it allocates no tensor and never synchronises; a call out of schedule loads synchronously.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from residency.plan import Plan
from residency.runtime.backend import Backend
from residency.runtime.device_memory import Binding, DeviceMemory
from residency.runtime.ledger import Ledger
from residency.runtime.schedule import Call, CallSchedule
from residency.telemetry.recorder import Recorder


@dataclass(slots=True)
class _PendingCall:
    """What before() of a block call leaves for its after(): one instance per executor, overwritten per call
    (so a call allocates no record)."""

    block: int = 0  # index of the block in the plan
    t_start: float = 0.0  # clock marks (backend.clock): the call entered before()
    t_ready: float = 0.0  # its weights are in place (copy waited for, or phase blocks loaded)
    t_dequant: float = 0.0  # its compute-side dequant has been issued
    copy: tuple[float, float, float] | None = None  # (start, copied, end) marks of the load it waited for
    nbytes: int = 0  # link bytes that load moved
    in_schedule: bool = False  # the call is where the schedule expects it (the cursors advance)
    reprime: bool = False  # the ring did not hold it: refill every slot after it
    streamed: bool = False
    volatile: Binding | None = None  # the binding's memory is reused after the call (slot, arena, scratch)
    versions: tuple[int, ...] = ()  # version counters of a volatile block's buffers when its call began


def version_of(t: torch.Tensor) -> int:
    """A tensor's version counter (bumped by every in-place op on it), or -1 for an inference tensor, which
    keeps none (a buffer made under torch.inference_mode: its in-place writes are not tracked). Such a
    tensor can also stop saying it is one once its .data is swapped, hence the try (~0.1 µs when it succeeds)."""
    try:
        return t._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return -1


class Executor:
    """Runs one attach's block calls: before(name) makes the block's weights computable, after(name) records
    the call and refills the slot it released."""

    def __init__(self, plan: Plan, schedule: CallSchedule, memory: DeviceMemory, backend: Backend,
                 ledger: Ledger, recorder: Recorder, tensors: dict[str, tuple[torch.Tensor, ...]],
                 homes: dict[str, tuple[torch.Tensor, ...]] | None = None):
        self.plan, self.schedule, self.memory, self.backend = plan, schedule, memory, backend
        self.ledger, self.recorder, self.tensors = ledger, recorder, tensors
        self.index = {bp.name: i for i, bp in enumerate(plan.blocks)}
        # each block's buffers (by position): a call may update one in place (a running state, a cache), and
        # the memory a streamed block computes from is refilled after the call: such writes are kept
        self.buffer_index = {n: tuple(i for i, t in enumerate(ts) if not isinstance(t, torch.nn.Parameter))
                             for n, ts in tensors.items()}
        # (block, tensor position, bound tensor, binding): the runtime keeps a buffer's write in the host blob
        # and the model's own tensor; set by the runtime
        self.keep_write: Callable[[str, int, torch.Tensor, Binding], None] | None = None
        # Between calls a block whose memory is reused (streamed, phase, packed) has its buffers parked on their
        # own storage (`homes`: the model's tensors as attach found them): read or reset from outside (a cache
        # zeroed between sequences) they are the block's state, not a slot another block's weights fill. The
        # versions they were parked at tell a write from outside, which the next call copies in.
        self.homes = homes or {}
        self.parked: dict[str, tuple[int, ...]] = {}
        self.sync = plan.execution.copy_mode == "sync"
        self.nslots = memory.slot_count
        self.bound: dict[str, Binding] = {}
        self.views: dict[str, tuple[torch.Tensor, ...]] = {}  # per block: the views its tensors were last bound to
        self.first_phase = {}
        for phase, names in memory.phase_layout.items():
            for name in names:
                self.first_phase.setdefault(name, phase)
        # --- bindings and recipes: made once, here ---
        self.session_binding = {n: memory.binding(n, base) for n, base in memory.session.items()}
        for name, base in memory.session.items():  # session blocks load now, once
            backend.run_now(memory.recipe(name, base, f"load {name}"))
        self.phase_binding, self.phase_recipes = {}, {}
        for phase, names in memory.phase_layout.items():
            self.phase_recipes[phase] = [memory.recipe(n, memory.arena_region(phase, n), f"load {n}") for n in names]
            for n in names:
                self.phase_binding[(phase, n)] = memory.binding(n, memory.arena_region(phase, n))
        self.phase_bytes = {ph: sum(r.link_bytes for r in rs) for ph, rs in self.phase_recipes.items()}
        self.slot_binding, self.slot_recipe, self.load_bytes = {}, {}, {}
        for bp in plan.streamed():
            for s, base in enumerate(memory.slots):
                self.slot_binding[(bp.name, s)] = memory.binding(bp.name, base)
                self.slot_recipe[(bp.name, s)] = memory.recipe(bp.name, base, bp.name)
            # what a load moves over the link, the same into any slot (the CPU's unpacking load: its plain tensors)
            self.load_bytes[bp.name] = self.slot_recipe[(bp.name, 0)].link_bytes
        # Every parameter points at device memory from the start (so pipe.device is the device).
        for bp in plan.blocks:
            if bp.name in self.session_binding:
                self._bind(bp.name, self.session_binding[bp.name])
            elif bp.placement == "streamed":
                self._bind(bp.name, self.slot_binding[(bp.name, 0)])
            else:
                self._bind(bp.name, self.phase_binding[(self.first_phase[bp.name], bp.name)])
        self.volatile = {bp.name for bp in plan.blocks if bp.placement == "streamed" or bp.lifetime == "phase" or (
            bp.name in self.session_binding and self.session_binding[bp.name].unpacks)}  # memory reused between calls
        for name in self.volatile:
            self._park(name)
        # --- the cursor and the ring ---
        self.position = 0  # expected position in the call stream
        self.streamed_before = 0  # streamed calls before `position` (the ring's ordinal of the next one)
        self.run_key: tuple[int, int] | None = None  # the phase run in progress
        self.arena_key: tuple | None = None  # the phase run whose blocks the arena holds
        self.slot_tag = [-1] * self.nslots  # streamed ordinal each slot holds (or is being loaded with)
        self.slot_block = [""] * self.nslots
        self.slot_ticket = [0] * self.nslots
        self.frame_open = False
        # Latent frames are numbered from here (set by the runtime): a plan switched to or recovered into
        # mid-session continues the session's numbers; a session start (frame 0) numbers from 1 again.
        self.frame_base = 0
        self._pending = _PendingCall()
        self.out_of_schedule_calls = 0
        self.resyncs = 0
        if self.nslots and not self.sync:
            self._prime(0)

    # --- parameter binding ---
    def _bind(self, name: str, binding: Binding) -> None:
        if self.bound.get(name) is not binding:
            # A metadata swap (set_data): the parameter object stays, only its storage changes.
            for t, v in zip(self.tensors[name], binding.views, strict=True):
                t.data = v
            self.bound[name] = binding
            self.views[name] = binding.views  # kept when parking unbinds the block: what its parameters point at

    # --- the ring of slots ---
    def _submit(self, k: int) -> None:
        sch = self.schedule
        if k >= sch.start_streamed and sch.frame_streamed == 0:
            return
        block = sch.call(sch.streamed_position(k)).block
        s = k % self.nslots
        # the tag last, and invalid meanwhile: a Ctrl-C between the submit and the tag left the slot tagged with
        # its old call and the new load's ticket, and the next call computed on another block's weights
        self.slot_tag[s] = -1
        self.slot_ticket[s] = self.backend.submit(self.slot_recipe[(block, s)])
        self.slot_block[s] = block
        self.slot_tag[s] = k

    def _prime(self, first: int) -> None:
        """Refill every slot from streamed call `first` on (after a resynchronisation; all slots are free)."""
        self.backend.drain()
        self.slot_tag = [-1] * self.nslots
        for k in range(first, first + self.nslots):
            self._submit(k)

    def _take_slot(self, name: str, ordinal: int, in_schedule: bool):
        s = ordinal % self.nslots
        b = self.backend
        if self.sync:
            b.run_now(self.slot_recipe[(name, s)])  # accelerate-style: blocking copy, then compute
            return self.slot_binding[(name, s)], b.copy_marks(0), False
        if in_schedule and self.slot_tag[s] == ordinal and self.slot_block[s] == name:
            b.wait(self.slot_ticket[s])
            return self.slot_binding[(name, s)], b.copy_marks(self.slot_ticket[s]), False
        # The ring does not hold this call: load it synchronously, never compute on a wrong slot.
        b.drain()
        self.slot_tag[s] = -1
        b.run_now(self.slot_recipe[(name, s)])
        return self.slot_binding[(name, s)], b.copy_marks(0), True

    # --- phases ---
    def _phase_block(self, name: str, phase: str, key: tuple):
        """Load the phase's blocks into the arena at the first call of the run that needs them."""
        copy, nbytes = None, 0
        if self.arena_key != key:
            b = self.backend
            recipes = self.phase_recipes[phase]
            if self.sync:
                for r in recipes:
                    b.run_now(r)
                copy = b.copy_marks(0)
            else:
                tickets = [b.submit(r) for r in recipes]
                b.wait(tickets[-1])
                first, last = b.copy_marks(tickets[0]), b.copy_marks(tickets[-1])
                copy = (first[0], last[1], last[2])
            nbytes = self.phase_bytes[phase]
            self.arena_key = key
        return self.phase_binding[(phase, name)], copy, nbytes

    # --- the hook entry points ---
    def before(self, name: str, scheduled: bool = True) -> None:
        """Bind block `name`'s weights before its call: wait for its load or load it, then unpack.

        `scheduled` False: a call the schedule never holds (a submodule or a tied head called on its own), taken out
        of schedule without matching or resyncing the cursor. Closes the frame record at a frame start. Raises DeviceBudgetExceeded when the budget was cut below
        what is held, a failed load's error, and the backend's out-of-memory error.
        """
        if self.ledger.over_budget:
            self.ledger.check()  # a budget cut: raise here, the runtime recovers
        b, sch = self.backend, self.schedule
        t0 = b.clock()
        call: Call = sch.call(self.position)
        in_schedule = scheduled and call.block == name
        if not scheduled:
            self.out_of_schedule_calls += 1
        elif not in_schedule:
            found = sch.resync(self.position, name)
            if found is not None:
                self.resyncs += 1
                self.position, self.streamed_before, in_schedule = found, sch.streamed_ordinal(found), True
                call = sch.call(found)
            else:
                self.out_of_schedule_calls += 1
        if in_schedule:
            if self.frame_open and (self.position == 0 or sch.is_frame_start(self.position)):
                self.recorder.end_frame(b.resolve, self.ledger.total_bytes, self.ledger.peak_total_bytes, t0)
            key = sch.run_key(self.position)
            if key != self.run_key:
                self.run_key, self.arena_key = key, None  # the previous run's phase blocks are evicted
        self.frame_open = True
        bp = self.plan.by_name[name]
        copy, nbytes, reprime = None, 0, False
        if bp.placement == "streamed":
            binding, copy, reprime = self._take_slot(name, self.streamed_before, in_schedule)
            nbytes = self.load_bytes[name]
        elif bp.lifetime == "phase":
            phase = call.phase if in_schedule else self.first_phase[name]
            binding, copy, nbytes = self._phase_block(name, phase, self.run_key if in_schedule else ("oos", phase))
        else:
            binding = self.session_binding[name]
        t_ready = b.clock()
        for fmt, src, out in binding.unpacks:  # dequant on the compute side, into the scratch
            fmt.unpack(src, out)
        self._bind(name, binding)
        pending = self._pending
        pending.block, pending.t_start, pending.t_ready, pending.t_dequant = self.index[name], t0, t_ready, b.clock()
        pending.copy, pending.nbytes, pending.in_schedule, pending.reprime = copy, nbytes, in_schedule, reprime
        pending.streamed = bp.placement == "streamed"
        pending.volatile = binding if (pending.streamed or bp.lifetime == "phase" or binding.unpacks) else None
        buffers = self.buffer_index[name] if pending.volatile is not None else ()
        pending.versions = tuple(version_of(self.tensors[name][i]) for i in buffers) if buffers else ()
        if buffers and pending.versions != self.parked.get(name, pending.versions):
            self._take_outside_writes(name, binding)

    def _park(self, name: str) -> None:
        """Point the block's buffers at their own storage until its next call (see homes)."""
        home = self.homes.get(name)
        idx = self.buffer_index[name]
        if home is None or not idx:
            return
        ts = self.tensors[name]
        for i in idx:
            ts[i].data = home[i]
        self.bound.pop(name, None)  # the next call binds every tensor again
        self.parked[name] = tuple(version_of(ts[i]) for i in idx)

    def _take_outside_writes(self, name: str, binding: Binding) -> None:
        """Buffers written from outside while parked (their own storage holds the new values): into this call's
        memory, and through keep_write into the host blob for later loads. Rare: a drain and a pack."""
        changed = self._changed(name, self.parked[name])
        if not changed:
            return
        self.backend.drain()
        home = self.homes[name]
        for i in changed:
            binding.views[i].copy_(home[i].to(binding.views[i].device, binding.views[i].dtype))
            if self.keep_write is not None:
                self.keep_write(name, i, binding.views[i], binding)
        self._reload_later(name, keep=self.streamed_before)  # this call's slot holds the new values already

    def _changed(self, name: str, versions: tuple[int, ...]) -> list[int]:
        """Positions of the block's buffers written since `versions` were taken."""
        ts = self.tensors[name]
        return [i for i, v in zip(self.buffer_index[name], versions, strict=True) if version_of(ts[i]) != v]

    def _reload_later(self, name: str, keep: int = -1) -> None:
        """Slots loaded (or loading) with the block's old bytes are loaded again at their call; `keep`: the
        streamed ordinal whose slot is already up to date."""
        for s in range(self.nslots):
            if self.slot_block[s] == name and self.slot_tag[s] != keep:
                self.slot_tag[s] = -1

    def unaliased(self, output: Any) -> Any:
        """`output` of the call in progress, with any tensor that is a view of the block's own weights (a
        position table returning `self.pe[:n]`) copied out: the memory they are bound to is refilled with
        another block's weights soon after the call. Cost: one storage look-up per output tensor, on blocks
        whose memory is reused only; the copy is made only when a view is found."""
        binding = self._pending.volatile
        if binding is None:
            return output
        ptrs = binding.storages
        if isinstance(output, torch.Tensor):
            return output.clone() if output.untyped_storage().data_ptr() in ptrs else output
        leaves, spec = tree_flatten(output)
        if not any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in ptrs for t in leaves):
            return output
        return tree_unflatten([t.clone() if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in ptrs
                               else t for t in leaves], spec)

    def after(self, name: str) -> None:
        """Record the call's timings and queue the load that reuses the slot the call released."""
        t_end = self.backend.clock()
        call = self._pending
        if call.versions:
            self._keep_buffer_writes(name, call)
            self._park(name)
        frame = self.schedule.frame_of(self.position)
        if frame == 0:
            self.frame_base = 0  # a session (re)starts
        self.recorder.record(frame + self.frame_base if frame else 0, call.block, call.t_start, call.t_ready,
                             call.t_dequant, t_end, call.copy, call.nbytes)
        if call.streamed and not self.sync:
            ordinal = self.streamed_before
            if not call.in_schedule or call.reprime:
                self._prime(ordinal + 1 if call.in_schedule else ordinal)
            else:
                self._submit(ordinal + self.nslots)  # the call that reuses the slot this one just released
        if call.in_schedule:
            self.position += 1
            self.streamed_before += call.streamed

    def _keep_buffer_writes(self, name: str, call: _PendingCall) -> None:
        """Buffers the call updated in place live in memory about to be reused: the runtime writes them back
        (host blob, the model's tensor), and a slot loaded with the block's old bytes is loaded again at its
        call. Rare (a stateful block), so its cost (a drain, a pack) is paid only when it happens."""
        changed = self._changed(name, call.versions)
        if not changed or self.keep_write is None:
            return
        self.backend.drain()  # no copy may be reading the blob while it is rewritten
        for i in changed:
            self.keep_write(name, i, self.tensors[name][i], call.volatile)
        self._reload_later(name)

    def resettle(self) -> None:
        """After a call that raised: Ctrl-C lands between any two lines of before() and after(). Every queued load
        finishes (a load counted but never queued is queued: CopyWorker.settle), the ring forgets what its slots
        hold (each is loaded again at its call) and so does the phase arena, and each block's tensors point where
        `bound` and `views` say — a bind cut short had swapped some of them, and the weight watch then refused every
        later call as a weight replaced. Cost: the next streamed calls load synchronously; on the error path only."""
        self.backend.settle()
        self.slot_tag = [-1] * self.nslots
        self.arena_key = None  # a phase load cut short left the arena part one phase's, part another's
        for name, ts in self.tensors.items():
            binding = self.bound.get(name)
            views = binding.views if binding is not None else self.views.get(name)
            if views is None:
                continue
            home = self.homes.get(name) if binding is None else None  # unbound: parked, buffers at home
            parked = set(self.buffer_index[name]) if home is not None else set()
            for i, (t, v) in enumerate(zip(ts, views, strict=True)):
                want = home[i] if i in parked else v
                if t.data_ptr() != want.data_ptr():
                    t.data = want

    def close_frame_if_done(self) -> None:
        """Between units: where the calls made finished a frame (the next call would start one), close the frame's
        record now rather than at that next call (recorder.eager_close only: marks that resolve without waiting)."""
        if self.frame_open and self.recorder.eager_close and self.schedule.is_frame_start(self.position):
            self.recorder.close_done_frame(self.backend.resolve, self.ledger.total_bytes, self.ledger.peak_total_bytes)
            self.frame_open = False

    def close_frame(self) -> None:
        """End the open frame's record now (detach, snapshot)."""
        if self.frame_open:
            self.recorder.end_frame(self.backend.resolve, self.ledger.total_bytes, self.ledger.peak_total_bytes)
            self.frame_open = False

    def stop(self) -> None:
        """Finish in-flight loads without raising a load's error again (detach after a failure)."""
        self.backend.settle()  # detach must finish even after a failed load (recovery detaches then)
