"""Switching a running Runtime to another plan between units of work: the closed loop's side of the runtime
(enable_closed_loop, calibrated_profile, prepack, switch_plan, adopt_profile). A mixin of Runtime, whose
attach/detach and units of work it calls; kept apart so each file holds one concern."""

from __future__ import annotations

from collections.abc import Callable

import torch

from residency.device import DeviceProfile
from residency.errors import ResidencyError
from residency.plan import Budget, Plan
from residency.runtime import block_buffers
from residency.runtime.closed_loop import ClosedLoop, LoopOptions
from residency.runtime.host_store import BlockBlob, pack_block
from residency.runtime.ledger import DeviceBudgetExceeded
from residency.telemetry.calibration import WARMUP_FRAMES, CalibrationFit, calibrate, calibration_window
from residency.telemetry.events import LoopEvent
from residency.units import fmt_bytes


class PlanSwitching:
    """Runtime's plan switching; every attribute it reads is Runtime's (see residency.runtime.runtime)."""

    def enable_closed_loop(self, options: LoopOptions | None = None, model: str = "",
                           say: Callable[[LoopEvent], None] | None = None) -> ClosedLoop:
        """Watch the frames and re-plan when they miss the budget or the prediction (residency.runtime.closed_loop).

        Returns the ClosedLoop (its `events`, `switches`; `options=LoopOptions(enabled=False)` turns it off,
        `max_switches` caps it). `say` gets each LoopEvent as it happens. Raises ResidencyError without a
        replan callable and profile, or with a profile of another kind of device than the backend's (a GPU profile
        on the CPU backend: fitted to this machine's timings it describes neither; its copy engine read 4× slow and
        the loop switched BF16 blocks to Q5_K)."""
        on_gpu = self.backend.device.type != "cpu"
        if (options is None or options.enabled) and self.profile is not None and self.profile.is_gpu != on_gpu:
            raise ResidencyError(
                f"the closed loop fits profile {self.profile.name!r} ({'a GPU' if self.profile.is_gpu else 'a CPU'} "
                f"profile) to this runtime's timings on the {'GPU' if on_gpu else 'CPU'}: a fit across kinds of "
                "device describes neither", hint="leave profile= out (this machine's profile), or leave the closed "
                                                 "loop off")
        self.loop = ClosedLoop(self, options, model, say)
        return self.loop

    def calibrated_profile(self, warmup_frames: int = WARMUP_FRAMES) -> CalibrationFit:
        """Fit the running plan's profile to the frames it ran (residency.telemetry.calibration.calibrate), the
        model named by the workload's name: the latent frames since the last plan switch (calibration_window),
        after the first `warmup_frames` of them.

        Returns the CalibrationFit (its `profile` carries the calibration record). Raises ResidencyError
        without the profile (a runtime made without profile=…), when no frame is left after the warm-up, or
        when the fit finds a figure absurdly off (broken telemetry)."""
        if self.profile is None:
            raise ResidencyError("calibration needs the profile the plan was made for",
                                 hint="pass Runtime(profile=…), or attach through residency.attach")
        if isinstance(warmup_frames, bool) or not isinstance(warmup_frames, int) or warmup_frames < 0:
            # a float raised TypeError from a slice; -1 fitted the last frame alone
            raise ResidencyError(f"calibrated_profile(warmup_frames={warmup_frames!r}): the frames skipped at the "
                                 "start of the running plan must be a whole number, 0 or more",
                                 hint=f"calibrated_profile() skips {WARMUP_FRAMES}; pass e.g. warmup_frames=2")
        snapshot = self.telemetry()
        window = calibration_window(snapshot, warmup_frames, since_s=self.plan_started_s)
        if not window.frames:
            running = len(calibration_window(snapshot, 0, since_s=self.plan_started_s).frames)
            since = " since the last plan switch" if running < sum(1 for f in snapshot.frames if f.frame > 0) else ""
            raise ResidencyError(f"calibration needs more than {warmup_frames} frames of the running plan (the "
                                 f"first settle the allocator and the copy ring); it has run {running}{since}",
                                 hint=f"run {warmup_frames + 8 - running} more frames (steps, or calls of the "
                                      "attached model) before calibrating; with `residency run`: --frames 8 or more")
        return calibrate(window, self.workload, self.plan, self.profile, model=self.workload.name,
                         warmup_frames=0)

    def prepack(self, plan: Plan) -> dict[tuple[str, str], BlockBlob]:
        """Pack the blocks whose format `plan` changes from the running plan's, from the original weights.

        Safe on a background thread while the running plan computes (it reads the host weights only). Returns
        (block, format) -> blob, for switch_plan. Cost: the quantization of those blocks (~0.5 s per 4M weights
        at Q4_K on the CPU)."""
        originals, running = self._originals, self.plan  # a detach replaces the dict: this one stays whole
        ready: dict[tuple[str, str], BlockBlob] = {}
        for bp in plan.blocks:
            if bp.format == running.by_name[bp.name].format or bp.name not in originals:
                continue
            spec = self.workload.by_name[bp.name]
            weights = {n: data for (n, _), (_, data) in zip(spec.tensors, originals[bp.name], strict=True)}
            ready[(bp.name, bp.format)] = pack_block(bp.name, None, spec, bp.format, weights)
        return ready

    def switch_plan(self, plan: Plan, profile: DeviceProfile | None = None,
                    ready: dict[tuple[str, str], BlockBlob] | None = None) -> None:
        """Run `plan` from the next unit of work on: detach the blocks, attach them under `plan` (blobs from
        `ready` where packed already). Call it between units of work; the session (KV cache, frame index, RNG)
        is not the runtime's and carries on. `profile`: the profile `plan` was made with (checked), kept for
        later re-plans. Raises ResidencyError inside a unit or detached; a failed attach re-attaches the
        running plan and raises. From another thread it waits for the running unit to end."""
        with self._unit_lock:
            self._switch_plan(plan, profile, ready)

    def _switch_plan(self, plan: Plan, profile: DeviceProfile | None,
                     ready: dict[tuple[str, str], BlockBlob] | None) -> None:
        if self.pipeline is None:  # first: a detached runtime's weight watch is stale (detach restored them)
            raise ResidencyError("the runtime is not attached", hint="attach(pipeline) first")
        if self._weights is not None:  # before the re-attach takes the edited weights as its baseline
            self._weights.check()
        if self._in_unit:
            raise ResidencyError("plans switch between units of work, not inside one",
                                 hint="call switch_plan between steps (or calls of the model)")
        plan.check_matches(self.workload, f"workload {self.workload.name!r}")
        if profile is not None:
            check_profile(plan, profile)
        pipeline, old, originals = self.pipeline, self.plan, self._originals
        self._detach_blocks()  # writes the blocks' updated buffers into the originals
        if ready:
            block_buffers.refresh(ready, originals)
        try:
            with torch.inference_mode(False):
                self._attach(pipeline, plan, ready)
        except BaseException:
            try:
                with torch.inference_mode(False):
                    self._attach(pipeline, old)
            except BaseException:
                self._remove_retry_hook()  # neither plan attached: the model is left plain, its watch closed
                raise
            raise
        if profile is not None:
            self.profile = profile
        self.recorder.prediction = plan.prediction

    def replan_now(self) -> Plan:
        """Plan again for the budget in force and run that plan from the next unit of work on; returns it. A cut
        set_budget re-plans by itself (at the next block call), a raise only through the closed loop: this is the
        way to use memory given back without it. The new plan is taken whatever it predicts (the running one was made
        for another budget). Raises ResidencyError without the planner (a Runtime made without replan= and
        profile=), detached, or inside a unit; DeviceBudgetExceeded (a BudgetError) when no plan fits: below what the
        running plan holds, as after a cut, the runtime then lets go of the model."""
        if self.replan is None or self.profile is None:
            raise ResidencyError("re-planning needs the planner and profile the plan was made with",
                                 hint="attach through residency.attach, or make the Runtime with replan= and profile=")
        with self._unit_lock:
            if self.pipeline is None:
                raise ResidencyError("the runtime is not attached", hint="attach(pipeline) first")
            if self._in_unit:
                raise ResidencyError("plans switch between units of work, not inside one",
                                     hint="call replan_now between steps (or calls of the model)")
            budget = self.ledger.budget_bytes
            # a plan counts one session's KV cache: the other live sessions' are planned around (as a recovery does)
            others = max(0, self._sessions.held_bytes() - self.workload.kv_cache_bytes(self.plan.kv_dtype))
            plan = self.replan(Budget(budget - others if 0 < others < budget else budget, self.plan.budget.frame_ms),
                               self.profile)
            check_profile(plan, self.profile)
            try:
                self._switch_plan(plan, None, None)
                if self.loop is not None:
                    self.loop.plan_replaced()
            except DeviceBudgetExceeded as e:
                if self.pipeline is not None:  # the running plan attached again
                    raise
                raise DeviceBudgetExceeded(  # as a cut no re-plan fits (recovering.Recovering._recover)
                    f"no plan fits the budget in force ({fmt_bytes(budget)}): {e.message}; the runtime let go of the "
                    "model, which runs as it did before attach (its own weights, no budget) from now on",
                    hint="set a budget the model fits (set_budget) and attach again") from e
        return plan

    def adopt_profile(self, profile: DeviceProfile, plan: Plan) -> None:
        """Keep running the same placements with `plan`'s corrected prediction, and re-plan later with `profile`
        (a calibration that found no better plan). Raises ResidencyError when `plan` places blocks otherwise."""
        if (plan.blocks != self.plan.blocks or plan.execution != self.plan.execution
                or plan.kv_dtype != self.plan.kv_dtype):
            raise ResidencyError("adopt_profile keeps the running placements; use switch_plan for another plan")
        self.profile, self.plan = profile, plan
        self.recorder.prediction = plan.prediction

    def clock_s(self) -> float:
        """The end of the last recorded frame's work on the backend clock, in seconds (0.0 before any): where
        a decision between units is placed on the trace (reading the clock itself would sync a GPU)."""
        last = self.recorder.latest(1)
        return last[0][0].start_s + last[0][0].frame_ms / 1e3 if last else 0.0


def check_profile(plan: Plan, profile: DeviceProfile) -> None:
    """Refuse a plan made with another profile than `profile` (a re-plan must plan with the profile it is given)."""
    if plan.profile_fingerprint != profile.fingerprint():
        raise ResidencyError(f"the plan was made for profile {plan.profile!r} (fingerprint {plan.profile_fingerprint}), "
                             f"not for {profile.name!r} (fingerprint {profile.fingerprint()})",
                             hint="re-planning needs the profile the plans are made for: replan(budget, profile) "
                             "must plan with the profile it is given")
