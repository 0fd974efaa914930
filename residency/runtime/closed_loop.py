"""The closed loop: measure each frame, calibrate the profile, re-plan off the compute thread, switch at a frame
boundary.

A "frame" here is one unit of work: a session step (the world model) or a top-level forward (a model attached
through residency.attach). After every unit the loop reads the frames the recorder closed (the first
`warmup_frames` of a plan are not evaluated: the ring and the allocator settle).

- Calibration: once `calibrate_frames` frames of a plan are in, it fits the profile to them
  (residency.telemetry.calibration) and re-predicts the running plan; when that still holds the frame budget the
  correction is adopted (later re-plans use the calibrated profile, the dashboard compares with the corrected
  prediction), else a re-plan starts.
- Misses: when `miss_frames` frames in a row miss the frame budget, or their prediction by more than `margin`,
  it calibrates on those frames only (the machine as it is now, not as it was) and starts a re-plan.

A re-plan runs on a background thread, which also packs the blocks whose format changes; the old plan keeps
running meanwhile. At the first unit boundary after it is ready the runtime switches to it (the session — KV
cache, frame index, RNG — is untouched: it lives in the session, not the runtime), unless it does not beat the
running plan re-predicted under the same calibration by `improve_by`; then the running plan's prediction is
corrected instead ("kept"). Hysteresis: no re-plan within `min_frames_between` frames of the last decision, and
at most `max_switches` switches. When a re-plan over the frame budget found nothing better (no plan holds on the
machine as it is), misses at that same level (any of the last `miss_frames` within `margin` of what that decision
measured) start no new one for a while: it would find the same plan every `min_frames_between` frames, at
0.2-1.5 s of a core each (on a 2-core box, half the machine the frames run on). The while backs off: 2, 4, then
8 × `min_frames_between` frames for each such decision in a row, so a load that eases for other plans more than for
the running one is still noticed. Frames off that level by more than `margin`, `miss_frames` in a row, are a change
of the machine and are decided on at once; so is any change of the running plan (an out-of-memory recovery) or of the budgets
(Runtime.set_budget).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from residency.device import DeviceProfile
from residency.errors import ResidencyError
from residency.plan import Budget, Plan
from residency.simulate import predict
from residency.telemetry.calibration import CalibrationFit, calibrate, robust_median
from residency.telemetry.events import LoopEvent
from residency.telemetry.recorder import FrameRecord
from residency.units import fmt_bytes, fmt_ms

# Defaults, with their reasons:
MISS_FRAMES = 4  # K: one slow frame is noise (a page fault, the OS); four in a row is a trend
MARGIN = 0.15  # prediction error that counts as "off": above the ±10 % a calibrated profile holds
MIN_FRAMES_BETWEEN = 24  # M: a decision needs K frames of evidence plus the new plan's warm-up and window
WINDOW_FRAMES = 16  # frames a calibration fits (the most recent, since the last switch)
CALIBRATE_FRAMES = 8  # frames evaluated (after the warm-up) before the first calibration of a plan
WARMUP_FRAMES = 2  # frames after a switch (or the start) not evaluated: the ring and the allocator settle
IMPROVE_BY = 0.05  # a new plan must beat the running one's re-predicted frame by this fraction
# After a re-plan found no plan that holds the budget, same-level misses wait 2^n × M frames (n: such decisions in a
# row, at most HOPELESS_BACKOFF_MAX): over 300 disturbed frames ~3 re-plans instead of ~10, yet none blind for good
HOPELESS_BACKOFF_MAX = 3


@dataclass(frozen=True)
class LoopOptions:
    """How the closed loop decides; see the module's defaults for why each is what it is."""
    enabled: bool = True
    miss_frames: int = MISS_FRAMES
    margin: float = MARGIN
    min_frames_between: int = MIN_FRAMES_BETWEEN
    max_switches: int | None = None  # None: no cap
    window_frames: int = WINDOW_FRAMES
    calibrate_frames: int = CALIBRATE_FRAMES
    warmup_frames: int = WARMUP_FRAMES
    improve_by: float = IMPROVE_BY
    background: bool = True  # re-plan on a thread (False: inline, for tests that need determinism)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a string where a number goes failed later, as a bare TypeError
            v, want = getattr(self, f.name), (bool,) if f.name in ("enabled", "background") else (int, float)
            if (v is not None or f.name != "max_switches") and (not isinstance(v, want) or
                                                                 (want != (bool,) and isinstance(v, bool))):
                raise ResidencyError(f"LoopOptions.{f.name} = {v!r:.40}: expected "
                                     f"{'True or False' if want == (bool,) else 'a number'}")
        for name in ("miss_frames", "min_frames_between", "window_frames", "calibrate_frames"):
            if getattr(self, name) < 1:
                raise ResidencyError(f"LoopOptions.{name} = {getattr(self, name)}: must be ≥ 1")
        if self.warmup_frames < 0 or not 0 < self.margin < 10 or not 0 <= self.improve_by < 1:
            raise ResidencyError("LoopOptions: warmup_frames ≥ 0, 0 < margin < 10 and 0 ≤ improve_by < 1",
                                 hint=f"got warmup_frames={self.warmup_frames}, margin={self.margin}, "
                                 f"improve_by={self.improve_by}")
        if self.max_switches is not None and self.max_switches < 0:
            raise ResidencyError(f"LoopOptions.max_switches = {self.max_switches}: must be ≥ 0 or None")


@dataclass
class _Pending:
    """A re-plan in flight on the background thread, and what it found."""
    fit: CalibrationFit
    trigger: str  # why: the misses that started it, or "calibration" (the running plan misses once corrected)
    measured_ms: float
    predicted_ms: float
    unit: int
    running: Plan  # the running plan re-predicted under the fit (what a new plan must beat)
    plan: Plan | None = None
    ready: dict | None = None  # (block, format) -> packed blob, for the blocks whose format changes
    error: BaseException | None = None
    done: threading.Event | None = None


@dataclass(frozen=True)
class _Hopeless:
    """A decision that found no plan holding the budget: the level it measured, what it was made under
    (ClosedLoop._decision_key) and the unit its back-off ends."""
    measured_ms: float
    key: tuple
    until_unit: int


def plan_change(old: Plan, new: Plan) -> str:
    """What changed between two plans, in words: "5 blocks now resident-Q8_0, 1 now streamed-Q4_K"."""
    moved = Counter(f"{b.placement}-{b.format}" for b in new.blocks
                    if (b.placement, b.format) != (old.by_name[b.name].placement, old.by_name[b.name].format))
    if not moved:
        return "same placements and formats"
    parts = [f"{n} now {what}" for what, n in moved.most_common()]
    parts[0] = parts[0].replace(" now", " blocks now", 1) if moved.most_common(1)[0][1] > 1 else parts[0]
    return ", ".join(parts)


def trigger_reason(fit: CalibrationFit, slower: bool | None = None) -> str:
    """The largest deviation a calibration found, in words ("copy engine 2.7× slower than profiled", "Q8_0
    dequant 1.6× faster than profiled"): ranked by ratio, so 0.5× (twice as fast) weighs as much as 2×.
    `slower`: whether the frame itself ran slower than predicted; the reason given then leans the same way
    where some engine does (a faster frame explained by one small block running slower read as a contradiction)."""
    found = [(abs(math.log(s)), "copy engine", s) for s in [fit.copy_scale] if s is not None]
    found += [(abs(math.log(s)), f"compute ({c})", s) for c, s in fit.compute_scale.items()]
    found += [(abs(math.log(s)), f"{f} dequant", s) for f, s in fit.dequant_scale.items()]
    if slower is not None:
        found = [f for f in found if (f[2] > 1) == slower] or found
    if not found:
        return "no engine measured"
    _, what, s = max(found)
    return f"{what} {s:.2f}× slower than profiled" if s >= 1 else f"{what} {1 / s:.2f}× faster than profiled"


class ClosedLoop:
    """Watches a runtime's frames and re-plans it when they miss (see the module docstring).

    `runtime` must have a replan callable and its profile; `budget` is the running plan's budget (its
    frame_ms, when set, is the frame budget held). Not thread-safe: the thread driving the runtime calls
    before_unit() and after_unit() around each unit of work (Runtime does so when the loop is enabled).
    """

    def __init__(self, runtime, options: LoopOptions | None = None, model: str = "",
                 say: Callable[[LoopEvent], None] | None = None):
        if runtime.replan is None or runtime.profile is None:
            raise ResidencyError("the closed loop re-plans: the runtime needs replan=… and profile=…",
                                 hint="attach through residency.attach, or pass Runtime(replan=…, profile=…)")
        self.runtime, self.options, self.model, self.say = runtime, options or LoopOptions(), model, say
        self.events: list[LoopEvent] = []
        self.switches = 0
        self.units = 0
        self.last_decision_unit = -10**9
        self._segment: list[tuple[FrameRecord, object]] = []  # (frame, rows) recorded since the last switch
        self._seen = 0  # frames of the recorder already read
        self._streak: list[tuple[FrameRecord, object]] = []  # the frames missed in a row, up to now
        self._calibrated = False  # the running plan's prediction has been corrected by a calibration
        self._pending: _Pending | None = None
        # The last decision that missed the budget and found no better plan (None: none since the last switch):
        # misses at its measured level are the same machine, already decided on, while the plan and budgets it was
        # decided under run, until the unit its back-off ends
        self._hopeless: _Hopeless | None = None
        self._hopeless_in_row = 0  # such decisions in a row (the back-off's exponent)
        self._raise_decided = 0  # the raised VRAM budget last re-planned for (one decision per raise)

    # --- the two calls around a unit of work ---
    def before_unit(self) -> None:
        """At a unit boundary: switch to a re-plan that has finished, if it is better."""
        p = self._pending
        if p is None or not p.done.is_set():
            return
        self._pending = None
        if p.error is not None:
            self._event("kept", p, f"re-plan failed ({p.error}); the running plan stays", None)
            return
        self._decide(p)

    def after_unit(self) -> None:
        """After a unit of work: read the frames it closed; calibrate once enough are in, and re-plan when
        `miss_frames` in a row miss (fitting those frames only: the machine as it is now)."""
        self.units += 1
        if not self.options.enabled:
            return
        o = self.options
        for frame, rows in self._new_frames():
            if frame.frame <= o.warmup_frames:
                continue
            self._segment.append((frame, rows))
            if self._missed(frame):
                self._streak.append((frame, rows))
            else:
                self._streak.clear()
        if self._pending is not None:
            return
        raised = self._budget_raised()
        if raised and len(self._segment) >= 2:  # more device memory: a plan for it may run faster, decided at once
            self._raise_decided = raised
            self._start(self._segment[-o.window_frames:], trigger=True,
                        why=f"frame {self.units}: the VRAM budget rose to {fmt_bytes(raised)} (set_budget)")
        elif len(self._streak) >= o.miss_frames and self._decided_already():
            del self._streak[:-o.miss_frames]  # a later decision fits only frames of the machine as it is then
        elif len(self._streak) >= o.miss_frames and self.units - self.last_decision_unit >= o.min_frames_between:
            self._start(self._streak[-o.window_frames:], trigger=True)
        elif not self._calibrated and len(self._segment) >= o.calibrate_frames:
            self._start(self._segment[-o.window_frames:], trigger=False)

    def _budget_raised(self) -> int | None:
        """The ledger's budget when set_budget raised it above the running plan's and no decision has been made on
        that budget yet; else None (a cut is a recovery's, at the next block call)."""
        vram = self.runtime.ledger.budget_bytes
        if vram > self.runtime.plan.budget.vram_bytes and vram != self._raise_decided:
            return vram
        return None

    def _decided_already(self) -> bool:
        """Whether the last `miss_frames` misses are not all off the level of the last decision that found no plan
        holding the budget (by more than `margin`), under the same plan and budgets, within its back-off:
        re-planning would find the same plan again."""
        h = self._hopeless
        if h is None:
            return False
        if not self._same_key(h.key):  # the plan or a budget changed: a new situation, decided afresh
            self._hopeless, self._hopeless_in_row = None, 0
            return False
        if self.units >= h.until_unit:  # the back-off is over: decide again (a longer one follows if in vain)
            self._hopeless = None
            return False
        # Any one of them near the level keeps it: a decision on frames that left it then fits only frames of the
        # new level (a median would decide once half had moved, on a window of both levels)
        return any(abs(f.frame_ms / h.measured_ms - 1) <= self.options.margin
                   for f, _ in self._streak[-self.options.miss_frames:])

    def _decision_key(self) -> tuple:
        """What a decision was made under: the running plan (a switch, an adopted correction or an out-of-memory
        recovery replaces the object) and the VRAM and frame budgets."""
        rt = self.runtime
        return rt.plan, rt.ledger.budget_bytes, self._budget_ms()

    def _same_key(self, key: tuple) -> bool:
        plan, vram, frame_ms = self._decision_key()
        return key[0] is plan and key[1:] == (vram, frame_ms)  # `is`: comparing plans field by field costs each frame

    # --- reading frames ---
    def _new_frames(self):
        rec = self.runtime.recorder
        new, self._seen = rec.closed_frames - self._seen, rec.closed_frames
        return rec.latest(new)

    def _budget_ms(self) -> float | None:
        return self.runtime.plan.budget.frame_ms

    def _missed(self, frame: FrameRecord) -> bool:
        budget = self._budget_ms()
        predicted = self.runtime.plan.prediction.frame_ms if self.runtime.plan.prediction else None
        over = budget is not None and frame.frame_ms > budget
        if predicted is None or predicted <= 0:
            return over
        error = frame.frame_ms / predicted - 1
        # The prediction is of a frame at the full KV window; until it is full a frame reads fewer cached frames
        # (FrameRecord.kv_frames, as its session said) and may run that much faster: only slower is off then.
        filling = frame.kv_frames is not None and frame.kv_frames < self.runtime.workload.context_frames
        return over or error > self.options.margin or (not filling and -error > self.options.margin)

    # --- calibrate and re-plan ---
    def _start(self, frames: list[tuple[FrameRecord, object]], trigger: bool, why: str | None = None) -> None:
        """Calibrate on `frames`; re-plan (on the background thread) when they missed (`trigger`) or when the
        running plan, re-predicted under the calibration, misses the frame budget; else adopt the correction."""
        rt = self.runtime
        window = rt.recorder.snapshot().with_frames(frames)
        measured = robust_median(f.frame_ms for f in window.frames)
        predicted = rt.plan.prediction.frame_ms if rt.plan.prediction else float("nan")
        self._streak.clear()
        self._calibrated = True
        if trigger:
            self.last_decision_unit = self.units
        try:
            fit = calibrate(window, rt.workload, rt.plan, rt.profile, model=self.model, warmup_frames=0)
        except ResidencyError as e:
            self._event("kept", None, f"frame {self.units}: calibration failed ({e.message})", None,
                        measured, predicted)
            return
        running = predict(rt.workload, rt.plan, fit.profile, bound=False)
        running_ms = running.prediction.frame_ms
        self._event("calibrated", None, f"frame {self.units}: {fit.summary()} (from {fit.frames} frames); the "
                    f"running plan re-predicted {fmt_ms(running_ms)} ms", running_ms, measured, predicted)
        budget = self._budget_ms()
        if not trigger and (budget is None or running_ms <= budget):
            rt.adopt_profile(fit.profile, running)  # holds: keep it, with the corrected prediction
            return
        if why is not None:  # the caller's reason (a raised budget)
            pass
        elif not trigger:
            why = (f"frame {self.units}: the running plan re-predicted {fmt_ms(running_ms)} ms, over the "
                   f"{fmt_ms(budget)} ms budget")
        elif budget is not None and measured > budget:
            why = f"frame {self.units}: {fmt_ms(measured)} ms over the {fmt_ms(budget)} ms budget"
        else:
            why = f"frame {self.units}: measured {fmt_ms(measured)} ms against {fmt_ms(predicted)} predicted"
        self.last_decision_unit = self.units
        pending = _Pending(fit, f"{why}; {trigger_reason(fit, measured > predicted)}", measured, predicted,
                           self.units, running, done=threading.Event())
        self._pending = pending
        budget = Budget(rt.ledger.budget_bytes, self._budget_ms())
        if self.options.background:
            threading.Thread(target=self._replan, args=(pending, budget), name="residency-replan",
                             daemon=True).start()
        else:
            self._replan(pending, budget)

    def _replan(self, p: _Pending, budget: Budget) -> None:
        """On the background thread: plan with the calibrated profile, pack the blocks whose format changes."""
        try:
            p.plan = self.runtime.replan(budget, p.fit.profile)
            p.ready = self.runtime.prepack(p.plan)
        except BaseException as e:  # reported at the next unit boundary, on the driving thread
            p.error = e
        finally:
            p.done.set()

    def _decide(self, p: _Pending) -> None:
        rt = self.runtime
        profile: DeviceProfile = p.fit.profile
        running = p.running  # no switch happens while a re-plan is pending: still the running plan
        running_ms = running.prediction.frame_ms
        new_ms = p.plan.prediction.frame_ms if p.plan.prediction else float("inf")
        budget = self._budget_ms()
        better = new_ms < running_ms * (1 - self.options.improve_by) or (
            budget is not None and running_ms > budget >= new_ms)
        same = all((b.placement, b.format) == (rt.plan.by_name[b.name].placement, rt.plan.by_name[b.name].format)
                   for b in p.plan.blocks) and p.plan.execution == rt.plan.execution
        if not better or same:
            rt.adopt_profile(profile, running)
            self._reset_segment(switched=False)
            over = budget is not None and p.measured_ms > budget and new_ms > budget
            quiet = ""
            if over:
                wait = self.options.min_frames_between * 2 ** min(self._hopeless_in_row + 1, HOPELESS_BACKOFF_MAX)
                self._hopeless_in_row += 1
                self._hopeless = _Hopeless(p.measured_ms, self._decision_key(), self.units + wait)
                quiet = (f"; no plan holds the budget here (frames near {fmt_ms(p.measured_ms)} ms): no re-plan for "
                         f"the next {wait} frames")
            else:
                self._hopeless, self._hopeless_in_row = None, 0
            self._event("kept", p, f"{p.trigger} — kept the running plan (re-predicted {fmt_ms(running_ms)} ms; "
                        f"the best new plan predicts {fmt_ms(new_ms)}){quiet}", running_ms)
            return
        cap = self.options.max_switches
        if cap is not None and self.switches >= cap:
            rt.adopt_profile(profile, running)
            self._reset_segment(switched=False)
            self._event("capped", p, f"{p.trigger} — a switch was due but the cap of {cap} is reached", running_ms)
            return
        old = rt.plan
        rt.switch_plan(p.plan, profile, p.ready)
        self.switches += 1
        self._reset_segment(switched=True)
        self._event("replanned", p, f"{p.trigger} — re-planned: {plan_change(old, p.plan)}, predicted "
                    f"{fmt_ms(new_ms)} ms", new_ms)

    def _reset_segment(self, switched: bool) -> None:
        """After a decision: a new plan starts a new segment (warm-up, then its own calibration)."""
        if switched:
            self._segment.clear()
            self._calibrated = False
            self._hopeless, self._hopeless_in_row = None, 0
        self._streak.clear()
        self.last_decision_unit = self.units

    def _event(self, kind: str, p: _Pending | None, reason: str, new_ms: float | None,
               measured: float | None = None, predicted: float | None = None) -> None:
        event = LoopEvent(self.units, kind, reason,
                          measured if p is None else p.measured_ms,
                          predicted if p is None else p.predicted_ms, new_ms,
                          self.runtime.clock_s())
        self.events.append(event)
        self.runtime.recorder.add_event(event)
        if self.say is not None:
            self.say(event)

    def plan_replaced(self) -> None:
        """The runtime switched plans outside the loop (Runtime.replan_now): a re-plan in flight was made against the
        plan replaced, so it is dropped (its adopt_profile refused the new placements; its switch undid the new
        plan), and the new plan starts a segment of its own."""
        self.close()
        self._pending = None
        self._raise_decided = self.runtime.ledger.budget_bytes  # that budget is planned for: no loop decision on it
        self._reset_segment(True)

    def close(self) -> None:
        """Wait for a re-plan in flight (a detach must not race the packing thread)."""
        if self._pending is not None and self._pending.done is not None:
            self._pending.done.wait()


def loop_options(closed_loop: bool | LoopOptions) -> LoopOptions | None:
    """The options `closed_loop` asks for (True: the defaults; False: None, no loop).

    Raises ResidencyError for anything else (a dict of options turned it on with the defaults). A front door calls
    it before attaching, so a wrong value leaves the model as it was."""
    if not isinstance(closed_loop, (bool, LoopOptions)):
        raise ResidencyError(f"closed_loop={closed_loop!r:.60}: give True, False or a LoopOptions",
                             hint="e.g. closed_loop=LoopOptions(max_switches=2) (residency.runtime.closed_loop)")
    if isinstance(closed_loop, LoopOptions):
        return closed_loop
    return LoopOptions() if closed_loop else None


def check_loop_can_replan(closed_loop: bool | LoopOptions, plan, profile) -> None:
    """Refuse, before anything is attached, a closed loop over a plan given for another profile than the one the
    runtime runs with: every re-plan would be for this one (a plan for one profile and a switch to a plan for
    another compare nothing). Said as "the runtime needs replan=…", it pointed at the call just made."""
    options = loop_options(closed_loop)
    if options is not None and options.enabled and plan.profile_fingerprint != profile.fingerprint():
        raise ResidencyError(f"closed_loop re-plans for the profile it runs with ({profile.name}), but the plan given "
                             f"was made for profile {plan.profile!r}",
                             hint="give a plan made with this profile, or leave plan= out to plan for it, or leave "
                                  "closed_loop off to run the plan as given")


def enable_loop(runtime, closed_loop: bool | LoopOptions) -> None:
    """Turn the attached runtime's closed loop on for True (default options) or a LoopOptions; False leaves it off.

    Raises ResidencyError, after detaching (attach fails as a whole: the model is restored), for a value that is
    not one of those, or when the runtime cannot re-plan: its plan was made for another profile."""
    try:
        options = loop_options(closed_loop)
        # a disabled loop over a runtime that cannot re-plan (a plan given for another profile) is no loop at all
        if options is not None and (options.enabled or runtime.replan is not None):
            runtime.enable_closed_loop(options, model=runtime.workload.name)
    except BaseException:
        runtime.detach()
        raise
