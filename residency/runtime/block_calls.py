"""The hooks on block modules: each turns the calls of its block's module(s) into executor calls.

A block that encloses others (the model's own tensors) is not hooked: its call is taken when the model's
call begins, and it stays bound throughout, the plan keeping it resident.

A block of one module is one executor call per call of the module. A block of several modules (siblings
the workload groups) is one call from the first of its modules to run until another block starts or the
call of the model ends — as residency.workload.from_module counts it — so its weights stay in their slot
while each member computes (closing after one member would let the next prefetch overwrite that slot).

A hooked module called while another's forward is still running (a block calling itself, or a module another block
calls from inside its forward: `self.shared(x)`, a layer passed in as an argument) is part of that call: its hook
does nothing. The workload counted it so (residency.workload.module_trace) and the plan keeps such a block bound
for the session; stepped as a call of its own, it moved the schedule under the outer call, whose slot the ring
then refilled while it still computed (wrong outputs, no error).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from residency.runtime.attached_guards import refuse_grad_inputs, warn_inference_only
from residency.runtime.executor import Executor
from residency.runtime.hooks import ModelHook, runs_user_forward_hooks


class BlockCalls:
    """The call of a several-module block still open, shared by every block hook of one attach; and the
    blocks that enclose the others (not hooked), called when the model's call begins."""

    def __init__(self, executor: Executor, enclosing: tuple[str, ...] = (), lock: threading.RLock | None = None):
        self.executor = executor
        self.enclosing = enclosing  # session-resident: bound for the whole call, a call only keeps the schedule
        self.open: str | None = None  # a several-module block whose call has not ended yet
        self.depth = 0  # hooked forwards running now, nested; only the outermost is an executor call
        self.thread = 0  # the thread that opened the outermost hooked call: depth is its, not another thread's
        self.lock = lock or threading.RLock()  # the runtime's unit lock: a reader's own call takes it
        # run before each outermost block call once the runtime armed it (something was added to the model): its
        # check for a call outside its units (a diffusers pipeline called as pipe(...)); None, one test, until then
        self.outside_unit: Callable[[], None] | None = None
        # the plan swaps weights in (attached_guards.swaps_weights): a block called on its own with autograd on runs
        # without it, as the model's calls do (set by the runtime); per thread (grad mode is torch's per thread),
        # a stack of whether each hooked call in progress turned it off
        self.no_autograd = False
        self._grads = threading.local()

    def autograd_off(self, args: tuple, kwargs: dict) -> None:
        """At a hooked call's start, before anything is bound (only where no_autograd): with autograd on — a block
        called on its own, outside the model's call, which turns it off itself — refuse an input that requires grad,
        else warn and turn it off for the call. Autograd kept the slot's weights for a backward that the next block's
        copy had overwritten (a user's loop over a streamed MLP's layers: input gradients off by 0.12 against 0.096
        at most, no error). Balanced by autograd_back. Cost: a thread-local push per call."""
        stack = self._grads.__dict__.setdefault("stack", [])
        off = torch.is_grad_enabled()
        if off:
            refuse_grad_inputs(args, kwargs)
            warn_inference_only()
            torch.set_grad_enabled(False)
        stack.append(off)

    def autograd_back(self) -> None:
        """At a hooked call's end (returned or raised): autograd back on where its start turned it off."""
        stack = self._grads.__dict__.get("stack")
        if stack and stack.pop():
            torch.set_grad_enabled(True)

    def start(self) -> None:
        """The model's call begins: each enclosing block takes its place in the schedule (the workload
        lists it first: from_module's loose block opens the first pass)."""
        self.depth = 0  # a forward that raised (and was caught inside the model) never ran its post
        self.thread = threading.get_ident()
        if self.open is not None:
            self.close()
        for name in self.enclosing:
            self.executor.before(name)
            self.executor.after(name)

    def close(self) -> None:
        """The call of the model (or the session's step) returned: end the open call."""
        if self.open is not None:
            name, self.open = self.open, None
            self.executor.after(name)

    def discard(self) -> None:
        """The call failed: the executor's record of the open call is not to be trusted; drop it."""
        self.open = None
        self.depth = 0


def _before(calls: BlockCalls, executor: Executor, name: str, scheduled: bool = True) -> None:
    """executor.before(name) for a hook that has raised the depth: a load that raises (a budget cut, a failed copy,
    Ctrl-C) gives it back. The wrapper runs pre_forward outside its try, so forward_failed would not: left raised,
    every later call outside the model's was taken for a nested one (a tied head off by 109, no error)."""
    try:
        if calls.outside_unit is not None:
            calls.outside_unit()
        executor.before(name, scheduled)
    except BaseException:
        calls.depth = max(0, calls.depth - 1)
        raise


def _bind(calls: BlockCalls, executor: Executor, name: str) -> None:
    """_before for a block's own hook: a load that raises also turns autograd back on where the call turned it off
    (its post_forward, which would, does not run)."""
    try:
        _before(calls, executor, name)
    except BaseException:
        if calls.no_autograd:
            calls.autograd_back()
        raise


class _DepthHook(ModelHook):
    """A forward that raised (and that the model may catch) leaves the depth as it found it: left raised, every
    later block of the call was taken for a nested one and computed on whatever its slot held. Autograd, turned off
    for the call (BlockCalls.autograd_off), is turned back on. (A KeyboardInterrupt runs no hook: both stay.)"""

    calls: BlockCalls

    def forward_failed(self, module) -> None:
        calls = self.calls
        if calls.no_autograd:
            calls.autograd_back()
        calls.depth = max(0, calls.depth - 1)


class BlockHook(_DepthHook):
    """On the one module of a block. Cost per call: a few attribute tests more than the executor's own (and under a
    plan that swaps weights in, BlockCalls.autograd_off/back's thread-local push and pop)."""

    def __init__(self, calls: BlockCalls, name: str):
        self.calls, self.executor, self.name = calls, calls.executor, name

    def pre_forward(self, module, args, kwargs) -> None:
        """Close any open group call, then let the executor bind the block's weights (nothing inside another
        hooked forward)."""
        calls = self.calls
        if calls.no_autograd:
            calls.autograd_off(args, kwargs)
        calls.depth += 1
        if calls.depth > 1:
            return
        calls.thread = threading.get_ident()
        if calls.open is not None:
            calls.close()
        _bind(calls, self.executor, self.name)

    def post_forward(self, module, output) -> Any:
        """Tell the executor the block's call ended (timing, next prefetch); the output, copied out of the
        block's memory where it is a view of its weights. A module with forward hooks of the user's runs them after
        this (they were registered after attach, around our forward): the call stays open, its weights bound,
        until the next block starts or the model's call ends, so a hook reading the weight reads this block's,
        not what its slot was refilled with."""
        calls = self.calls
        if calls.no_autograd:
            calls.autograd_back()
        calls.depth -= 1
        if calls.depth > 0:  # nested: part of the call running around it
            return output
        output = self.executor.unaliased(output)
        if runs_user_forward_hooks(module):
            self.calls.open = self.name
            return output
        self.executor.after(self.name)
        return output


class GroupHook(_DepthHook):
    """On each module of a several-module block: consecutive calls of its members are one call."""

    def __init__(self, calls: BlockCalls, name: str):
        self.calls, self.name = calls, name

    def pre_forward(self, module, args, kwargs) -> None:
        """Start the block's call unless this member continues the call in progress."""
        calls = self.calls
        if calls.no_autograd:
            calls.autograd_off(args, kwargs)
        calls.depth += 1
        if calls.depth > 1 or calls.open == self.name:  # nested, or the next member of the call in progress
            return
        calls.thread = threading.get_ident()
        if calls.open is not None:
            calls.close()
        _bind(calls, calls.executor, self.name)

    def post_forward(self, module, output) -> Any:
        """Leave the call open: the next member, or the next block's call, closes it."""
        calls = self.calls
        if calls.no_autograd:
            calls.autograd_back()
        calls.depth -= 1
        if calls.depth > 0:
            return output
        calls.open = self.name
        return calls.executor.unaliased(output)


class ReaderHook(_DepthHook):
    """On a module that computes from a block's weights without being the block (runtime.weight_readers: a
    submodule of a streamed, phase or packed block; `inside` False: a module outside the blocks holding one of its
    parameters, a head tied to its embedding). Called inside a block call on the thread running it, it is part of
    that call: bypassed (~0.3 µs). Called on its own it is one call of its block, out of schedule (the cursor stays
    where the model's calls left it: a tied head's calls counted as the next frame's and split every frame), loaded
    synchronously, under the runtime's unit lock (another thread's call waits, as a model call does).

    Under torch.compile an inner reader is traced as part of the compiled block around it; an outside one runs
    eagerly, whole (a graph break), as a block does."""

    def __init__(self, calls: BlockCalls, name: str, inside: bool = True):
        self.calls, self.executor, self.name = calls, calls.executor, name
        self.traced_when_compiling = inside
        # per call in progress: None when bypassed, else the grad mode to restore (its own call runs without autograd,
        # as the model's calls do: gradients through reused memory would be wrong)
        self.started: list[bool | None] = []

    def bypass(self) -> bool:
        calls = self.calls
        return (calls.depth > 0 or calls.open == self.name) and calls.thread == threading.get_ident()

    def pre_forward(self, module, args, kwargs) -> None:
        if self.bypass():
            self.started.append(None)
            return
        calls = self.calls
        calls.lock.acquire()  # re-entrant: the thread in a unit holds it already
        try:
            calls.depth += 1
            calls.thread = threading.get_ident()
            if calls.open is not None:
                calls.close()
            _before(calls, self.executor, self.name, scheduled=False)
        except BaseException:
            calls.lock.release()
            raise
        grad = torch.is_grad_enabled()
        if grad:
            warn_inference_only()
            torch.set_grad_enabled(False)
        self.started.append(grad)

    def post_forward(self, module, output) -> Any:
        grad = self.started.pop()
        if grad is None:
            return None
        try:
            torch.set_grad_enabled(grad)
            self.calls.depth -= 1
            output = self.executor.unaliased(output)
            self.executor.after(self.name)
        finally:
            self.calls.lock.release()
        return output

    def forward_failed(self, module) -> None:
        grad = self.started.pop() if self.started else None
        if grad is not None:
            torch.set_grad_enabled(grad)
            self.calls.depth = max(0, self.calls.depth - 1)
            self.calls.lock.release()
