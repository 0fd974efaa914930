"""simulate(workload, plan, profile): the timeline of a session start and of steady latent frames.

The one cost model: planners score candidates with it, and the runtime's measurements are checked
against it. Frames from the second on are taken at a full KV window (the steady state).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from residency.device.profile import DeviceProfile
from residency.plan.plan import Plan, Prediction
from residency.simulate.bounds import lower_bound_s
from residency.simulate.costs import CallCost, call_cost, copy_bytes, load_cost
from residency.simulate.engine import Job, run
from residency.simulate.memory import peak_bytes
from residency.simulate.quality import quality_loss
from residency.workload.spec import Workload

MIN_STEADY_FRAME = 3  # session start + frame 1 (first), frame 2, frame 3 (steady) at the least
MAX_STEADY_FRAME = 12


@dataclass(frozen=True)
class TimelineEvent:
    """One interval on a simulated track (copy, dequant or compute), in ms since the session start."""
    track: str  # "copy" | "dequant" | "compute"
    label: str  # block name ("load <block>" for a resident block's load)
    frame: int  # 0 = session start
    phase: str
    start_ms: float
    end_ms: float
    nbytes: int = 0  # bytes moved (copy track)


@dataclass(frozen=True)
class Simulation:
    """A simulator run: the prediction and the timeline of every frame it simulated."""
    prediction: Prediction
    jobs: tuple[Job, ...] = field(repr=False)  # the engine's timed calls, as run() left them
    steady_frame: int  # the frame the prediction's steady figures come from

    @cached_property
    def events(self) -> tuple[TimelineEvent, ...]:
        """Every frame simulated, in time order per track. Built on first use: a planner scores dozens of
        candidates and reads only their predictions, and building these took ~27% of each simulation."""
        return _events(self.jobs)


class _JobBuilder:
    def __init__(self, workload: Workload, plan: Plan, profile: DeviceProfile):
        self.w, self.plan, self.profile = workload, plan, profile
        self.jobs: list[Job] = []
        self._costs: dict[tuple[str, bool, int], CallCost] = {}

    def cost(self, block: str, kv_read: bool, ctx: int) -> CallCost:
        key = (block, kv_read, ctx)
        c = self._costs.get(key)
        if c is None:
            c = self._costs[key] = call_cost(self.w.by_name[block], self.plan.by_name[block], self.profile,
                                             self.plan.execution, ctx, kv_read, self.plan.kv_dtype, self.w.batch)
        return c

    def load(self, block: str, frame: int, phase: str) -> None:
        bp = self.plan.by_name[block]
        seconds = load_cost(self.w.by_name[block], bp, self.profile, self.plan.execution)
        nbytes = copy_bytes(self.w.by_name[block], bp.format, bp.compute_dtype, self.profile,
                            unpacks=bp.placement == "resident")
        if self.plan.execution.copy_mode == "sync":  # a blocking load holds the compute stream
            self.jobs.append(Job(label=f"load {block}", frame=frame, phase=phase, compute_s=seconds,
                                 copy_bytes=nbytes, blocking_copy_s=seconds))
        else:
            self.jobs.append(Job(label=f"load {block}", frame=frame, phase=phase, compute_s=0.0,
                                 copy_s=max(seconds, 1e-12), copy_bytes=nbytes))

    def phase(self, ph, frame: int, ctx: int, loaded: set[str]) -> None:
        in_phase: set[str] = set()
        for p in ph.passes:
            kv_read = p.kv != "none"
            for _ in range(self.w.count(p)):
                for name in p.blocks:
                    bp = self.plan.by_name[name]
                    if bp.placement != "streamed":
                        scope = loaded if bp.lifetime == "session" else in_phase
                        if name not in scope:
                            self.load(name, frame, ph.name)
                            scope.add(name)
                    c = self.cost(name, kv_read, ctx)
                    self.jobs.append(Job(
                        label=name, frame=frame, phase=ph.name, compute_s=c.compute_s,
                        dequant_s=c.dequant_s if bp.dequant_on == "compute" or not c.streamed else 0.0,
                        copy_s=c.copy_s, copy_bytes=c.copy_bytes, uses_slot=c.streamed,
                        copy_dequant_s=c.dequant_s if c.streamed and bp.dequant_on == "copy" else 0.0,
                        blocking_copy_s=c.blocking_copy_s))


def _events(jobs: tuple[Job, ...]) -> tuple[TimelineEvent, ...]:
    out = []
    for j in jobs:
        if j.copy_start >= 0 and j.copy_end > j.copy_start:
            out.append(TimelineEvent("copy", j.label, j.frame, j.phase, j.copy_start * 1e3, j.copy_end * 1e3,
                                     j.copy_bytes))
        if j.end > j.start and j.compute_s > 0:
            stretch = (j.end - j.start) / j.compute_s
            loaded = j.start + _blocking_s(j)  # a sync load, on the compute stream: the copy's time
            if j.blocking_copy_s > 0:
                out.append(TimelineEvent("copy", j.label, j.frame, j.phase, j.start * 1e3, loaded * 1e3, j.copy_bytes))
            split = loaded + j.dequant_s * stretch
            if j.dequant_s > 0:
                out.append(TimelineEvent("dequant", j.label, j.frame, j.phase, loaded * 1e3, split * 1e3))
            if j.end > split:
                out.append(TimelineEvent("compute", j.label, j.frame, j.phase, split * 1e3, j.end * 1e3))
    return tuple(out)


def _blocking_s(j: Job) -> float:
    """Seconds of `j`'s compute-stream span that are its sync load (its share of any slowdown included)."""
    if j.blocking_copy_s <= 0 or j.compute_s <= 0 or j.end <= j.start:
        return 0.0
    return j.blocking_copy_s * (j.end - j.start) / j.compute_s


def simulate(workload: Workload, plan: Plan, profile: DeviceProfile,
             sensitivity: Mapping[str, Mapping[str, float]] | None = None, frames: int | None = None,
             bound: bool = True) -> Simulation:
    """bound=False skips the lower bound (an LP, ~10–80 ms) and reports NaN: for scoring many candidates."""
    plan.check_matches(workload, f"workload {workload.name!r}")
    # Copies can run up to `slots` streamed calls ahead of compute; with few streamed calls per frame
    # that lead spans frames. The steady frame is measured once the lead is built up, and frames
    # after it are simulated too, so that the copies they prefetch interfere with it as they would.
    per_frame = sum(workload.count(p) for ph in workload.frame_phases() for p in ph.passes
                    for n in p.blocks if plan.by_name[n].placement == "streamed")
    lead = -(-plan.execution.slots // per_frame) if per_frame else 0
    steady = min(MAX_STEADY_FRAME, max(MIN_STEADY_FRAME, 2 + lead))
    frames = steady + lead if frames is None else frames
    steady = min(steady, frames)
    b = _JobBuilder(workload, plan, profile)
    loaded: set[str] = set()
    for ph in workload.session_phases():
        b.phase(ph, 0, 0, loaded)
    for frame in range(1, frames + 1):
        ctx = min(frame, workload.context_frames) if frame == 1 else workload.context_frames
        for ph in workload.frame_phases():
            b.phase(ph, frame, ctx, loaded)
    jobs = b.jobs
    run(jobs, plan.execution.slots, profile.copy_slowdown_factor(), profile.compute_slowdown_factor(),
        plan.execution.lookahead_from_compute_start)

    ends = {f: max(j.end for j in jobs if j.frame == f) for f in range(1, frames + 1)}
    t0 = ends[steady - 1] if steady > 1 else 0.0
    t1 = ends[steady]
    frame_jobs = [j for j in jobs if j.frame == steady]
    # a sync load is the copy engine's time and, the compute stream waiting on it, a stall: as the runtime records
    # it (a blocking load between the call's start and its ready mark), so the dashboard compares like with like
    blocking = sum(_blocking_s(j) for j in frame_jobs)
    compute_busy = sum(j.end - j.start for j in frame_jobs) - blocking
    copy_busy = sum(j.copy_end - j.copy_start for j in frame_jobs if j.copy_start >= 0) + blocking
    prediction = Prediction(
        frame_ms=(t1 - t0) * 1e3,
        first_frame_ms=ends[1] * 1e3,
        stall_ms=max(0.0, (t1 - t0) - compute_busy) * 1e3,
        copy_ms=copy_busy * 1e3,
        compute_ms=compute_busy * 1e3,
        link_bytes_per_frame=sum(j.copy_bytes for j in frame_jobs),
        peak_bytes=peak_bytes(workload, plan, profile),
        lower_bound_ms=lower_bound_s(workload, plan, profile) * 1e3 if bound else float("nan"),
        quality_loss=quality_loss(workload, plan, sensitivity),
    )
    return Simulation(prediction, tuple(jobs), steady)


def predict(workload: Workload, plan: Plan, profile: DeviceProfile,
            sensitivity: Mapping[str, Mapping[str, float]] | None = None, bound: bool = True) -> Plan:
    """The plan with the simulator's prediction filled in."""
    return plan.with_prediction(simulate(workload, plan, profile, sensitivity, bound=bound).prediction)
