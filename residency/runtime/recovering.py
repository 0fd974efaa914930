"""Recovery from out-of-memory: a unit of work (a call of the model, a session's step) that runs out of device
memory (torch's, or the ledger's after `set_budget` cut the budget) is re-planned for the memory left,
re-attached and run again — or, where a second run would see a change the first made, re-planned for and
refused (retry_safety). A mixin of Runtime, whose attach/detach it calls; kept apart so each file holds one
concern."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from residency.budget_size import refuse_unitless, vram_bytes
from residency.errors import ResidencyError
from residency.formats.dtypes import DTYPE_FORMAT
from residency.plan import Budget
from residency.runtime.attached_guards import refuse_grad_inputs, refuse_training
from residency.runtime.hooks import ModelHook
from residency.runtime.ledger import DeviceBudgetExceeded
from residency.runtime.not_pickled import allow_copies, refuse_copies
from residency.runtime.plan_switching import check_profile
from residency.runtime.recovery import MAX_RECOVERIES, RECOVERABLE, recovery_budget
from residency.runtime.retry_safety import CallState, capture
from residency.runtime.structure_watch import model_label
from residency.units import MAX_SIZE_BYTES, fmt_bytes, parse_size

if TYPE_CHECKING:
    from residency.runtime.runtime import Runtime


class RetryHook(ModelHook):
    """On the model itself: one call of it is the unit a recovery retries."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def init_hook(self, module: nn.Module) -> None:
        refuse_copies(module)

    def detach_hook(self, module: nn.Module) -> None:
        allow_copies(module)

    def new_forward(self, module, forward, args, kwargs):
        rt = self.runtime
        if rt.call_check is not None:
            rt.call_check(args, kwargs)
        if rt._swapped_inputs is not None:
            rt._swapped_inputs(args, kwargs)
        return rt._unit(rt._model_call, (forward, args, kwargs), {},
                        state=lambda: capture(rt._input_names, args, kwargs, rt._model_buffers))


SESSION_FITS = 4  # plans tried per recovery to make room for the other live sessions' KV caches


class Recovering:
    """Runtime's recovery and the budget that triggers it; every attribute it reads is Runtime's (see
    residency.runtime.runtime)."""

    @property
    def attached(self) -> bool:
        """Whether the runtime holds the model now: False once detached, or after it let go of the model when no plan
        fitted a budget cut (attach() again, after a set_budget the plan fits)."""
        return self.pipeline is not None

    @property
    def budget_bytes(self) -> int:
        """The device budget in force: the last set_budget's (or the plan's). `plan.budget` is the one the running
        plan was made for, which a cut or raise set_budget did not re-plan for leaves as it was."""
        return self.ledger.budget_bytes

    def set_budget(self, budget_bytes: int | str) -> None:
        """Another program took (or returned) device memory; a cut below use triggers a recovery at the
        next block call (or step). `budget_bytes`: whole bytes, a size ("6GiB"), or a share of the model's weights at
        the plan's compute dtype ("50%", as attach(vram=…) reads it). Raises ResidencyError for
        anything else (a float, a negative number): taken as given, -5 had become the budget. Detached (or
        let go of the model when no plan fitted a cut), it is the budget the next `attach` holds its plan to."""
        if isinstance(budget_bytes, str) and budget_bytes.strip().endswith("%"):
            # each block's weights at its compute dtype: attach's figure when, as every policy plans, there is one
            weights = sum(self.workload.by_name[bp.name].nbytes(DTYPE_FORMAT[bp.compute_dtype]) for bp in self.plan.blocks)
            try:
                budget_bytes = vram_bytes(budget_bytes, weights, 0)
            except ResidencyError as e:  # its words are attach's (vram=…): named as this call
                raise ResidencyError(f"set_budget({budget_bytes!r}): {e.message.split(': ', 1)[-1]}",
                                     hint=e.hint) from None
        elif isinstance(budget_bytes, str):
            # "50" is a typo for "50GiB" more likely than 50 bytes, as attach(vram=…) reads it: taken as bytes, the
            # next call let go of the model
            refuse_unitless(budget_bytes, lambda v: f"set_budget({v})")
            budget_bytes = parse_size(budget_bytes, "the budget")
        elif (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, numbers.Integral)
              or not 0 < budget_bytes <= MAX_SIZE_BYTES):
            raise ResidencyError(f"set_budget({budget_bytes!r}): the device budget is whole bytes from 1 to 2**60",
                                 hint="e.g. rt.set_budget(6 * 2**30), rt.set_budget('6GiB') or rt.set_budget('50%')")
        self.ledger.set_budget(int(budget_bytes))

    def _attach_within_budget(self, pipeline) -> None:
        """_attach the running plan; one that does not fit a budget set_budget cut while detached is re-planned for it
        (with a replan callable), as a cut mid-session is: it was refused where the same cut after the first step
        re-planned and ran."""
        try:
            self._attach(pipeline, self.plan)
        except DeviceBudgetExceeded:
            if self.replan is None or self.ledger.budget_bytes >= self.plan.budget.vram_bytes:
                raise
            plan = self.replan(Budget(self.ledger.budget_bytes, self.plan.budget.frame_ms), self.profile)
            check_profile(plan, self.profile)
            self._attach(pipeline, plan)
            self.recorder.prediction = plan.prediction

    def _retry(self, call: Callable[..., Any], args: tuple, kwargs: dict,
               undo: Callable[[], None] | None = None, state: Callable[[], CallState] | None = None) -> Any:
        """call(*args, **kwargs); after an out-of-memory: undo(), re-plan, re-attach and call again — unless
        `state` (what the call could change, taken before each attempt) says the attempt changed something a
        second run would see twice: then re-planned, and the call refused (retry_safety)."""
        if self._retrying:  # inside a step or an outer call of the model: that one is retried whole
            return call(*args, **kwargs)
        if self._swaps and torch.is_grad_enabled():  # before anything runs (the call then runs without autograd)
            refuse_grad_inputs(args, kwargs)
            refuse_training(self.pipeline)
        self._retrying = True
        try:
            if self.replan is not None and self.ledger.over_budget:
                # a cut set_budget made between calls: re-planned before this call runs, so a call that changes what
                # it is given (a KV cache it appends to) needs no second run, which it could not be given (a
                # generate() cut between two tokens was refused as "not run again")
                try:
                    self.ledger.check()
                except DeviceBudgetExceeded as e:
                    self._recover(e)
            for attempt in range(MAX_RECOVERIES + 1):
                before = state() if state is not None and self.replan is not None else None
                try:
                    with self._autograd_guard():  # per attempt: a recovery or switch may have changed the plan
                        return call(*args, **kwargs)
                except RECOVERABLE as e:
                    if undo is not None:
                        undo()
                    if self.replan is None or attempt == MAX_RECOVERIES:
                        raise
                    changed = before.changed() if before is not None else None
                    self._recover(e)
                    if changed is not None:
                        self._not_run_again(e, changed)
                    if before is not None:
                        before.rewind()
        finally:
            self._retrying = False
        raise AssertionError("unreachable")

    def _not_run_again(self, cause: BaseException, changed: str) -> None:
        """Raise the error of a call that was re-planned for but not run again (`changed`: why not)."""
        model = model_label(self._root) if self._root is not None else "the model"
        raise ResidencyError(
            f"{model} ran out of device memory ({type(cause).__name__}) and was re-planned for "
            f"{fmt_bytes(self.recoveries[-1][1])}, but this call was not run again: {changed}, and a second run "
            "would see that twice",
            hint="call it again with its state as it was before this call (a generate(): run it again from the "
                 "prompt); later calls run under the new plan") from cause

    def _recover(self, cause: BaseException) -> None:
        budget = recovery_budget(cause, self.ledger.budget_bytes, self.ledger.total_bytes, self.backend.device)
        pipeline = self.pipeline
        self._detach_blocks()
        self.ledger.set_budget(budget)
        # a plan counts one session's KV cache: the others alive (two players, an old game kept) are planned around,
        # or every re-plan was one that fitted one session and failed again on the second (4 tries, then the error)
        held_kv = self._sessions.held_bytes()
        others = max(0, held_kv - self.workload.kv_cache_bytes(self.plan.kv_dtype))
        planned_for = budget - others if 0 < others < budget else budget
        try:
            for attempt in range(SESSION_FITS):
                plan = self.replan(Budget(planned_for, self.plan.budget.frame_ms), self.profile)
                check_profile(plan, self.profile)
                # A retried call of the model may run under inference_mode; tensors made in it are read-only
                # outside it, and the copy thread writes the new slots outside it.
                with torch.inference_mode(False):
                    self._attach(pipeline, plan)
                # what the plan holds beside one KV cache, with every live session's: over by the planner's margin
                # of error (its activations against the ledger's), it is planned again for that much less
                short = self.ledger.total_bytes - self._memory.reserved["kv_cache"] + held_kv - budget
                if not others or short <= 0 or attempt == SESSION_FITS - 1:
                    break
                self._detach_blocks()
                planned_for -= max(short, budget // 64)  # a plan's step in memory is rarely a few bytes
        except DeviceBudgetExceeded as e:
            self._remove_retry_hook()  # the model is left plain, as detach() leaves it
            fewer = ", fewer context frames" if self.workload.kv_cache_bytes() else ""
            raise DeviceBudgetExceeded(
                f"no plan fits the device memory left ({fmt_bytes(budget)}): {e.message}; the runtime let go of "
                "the model, which runs as it did before attach (its own weights, no budget) from now on",
                hint=f"free device memory and attach again, or attach with a plan of smaller formats{fewer}"
                ) from cause
        except BaseException:
            self._remove_retry_hook()
            raise
        self.recorder.prediction = plan.prediction
        self.recoveries.append((type(cause).__name__, budget))
