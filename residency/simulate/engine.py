"""The two-engine timeline: a copy engine and a compute stream, with slots, prefetch and interference.

When both engines are busy the copy runs at rate 1/s_k and compute at 1/s_c, the profile's slowdown factors
(DeviceProfile.copy_slowdown_factor, compute_slowdown_factor). A profile that measured only an overlap o has
s_k = s_c = 2 − o, so a copy C beside compute K started together takes max(C, K) + (1 − o)·min(C, K).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Job:
    """One block call on the compute stream, with the copy (if any) it waits for."""

    label: str  # block name
    frame: int  # 0 = session start, 1.. = latent frames
    phase: str
    compute_s: float
    dequant_s: float = 0.0  # part of compute_s at its start (dequant on compute), for the timeline
    copy_s: float = 0.0  # copy-engine work this call waits for
    copy_bytes: int = 0
    uses_slot: bool = False  # the copy lands in a ring slot (streamed), else in the block's own memory
    copy_dequant_s: float = 0.0  # part of copy_s that is dequantization (dequant_on == "copy")
    blocking_copy_s: float = 0.0  # part of compute_s at its start: a load the compute stream makes (copy_mode sync)
    # filled by run():
    copy_start: float = -1.0
    copy_end: float = -1.0
    start: float = -1.0
    end: float = -1.0


def run(jobs: list[Job], slots: int, copy_slowdown: float, compute_slowdown: float,
        lookahead_from_compute_start: bool = False) -> None:
    """Fill the start/end times of every job, in seconds from 0. O(len(jobs)).

    `slots`: ring slots of streamed copies (≥ 1). `copy_slowdown`, `compute_slowdown` (≥ 1): factors by which
    each engine's work takes longer while the other is busy. `lookahead_from_compute_start`: a copy starts only
    once the previous call has started computing. Raises RuntimeError when no engine can proceed (a bad plan).
    """
    n = len(jobs)
    copy_jobs = [i for i, j in enumerate(jobs) if j.copy_s > 0 or j.uses_slot]
    slot_owner_before: dict[int, int] = {}  # copy-job index -> compute job whose slot it reuses
    slot_calls = [i for i in copy_jobs if jobs[i].uses_slot]
    for k, i in enumerate(slot_calls):
        if k >= slots:
            slot_owner_before[i] = slot_calls[k - slots]
    copy_shared_rate, comp_shared_rate = 1.0 / copy_slowdown, 1.0 / compute_slowdown
    t = 0.0
    ci = 0  # next compute job
    qi = 0  # next copy job (index into copy_jobs)
    copy_left = comp_left = 0.0
    copy_busy = comp_busy = False
    while ci < n:
        if not copy_busy and qi < len(copy_jobs):
            i = copy_jobs[qi]
            owner = slot_owner_before.get(i)
            slot_free = owner is None or 0 <= jobs[owner].end <= t
            ahead_ok = not lookahead_from_compute_start or i == 0 or 0 <= jobs[i - 1].start <= t
            if slot_free and ahead_ok:
                jobs[i].copy_start = t
                copy_left, copy_busy = jobs[i].copy_s, True
        if not comp_busy:
            j = jobs[ci]
            waits = (j.copy_s > 0 or j.uses_slot) and not (0 <= j.copy_end <= t)
            if not waits:
                j.start = t
                comp_left, comp_busy = j.compute_s, True
        if not copy_busy and not comp_busy:  # cannot happen with slots >= 1; guard against a bad plan
            raise RuntimeError("simulator deadlock: a copy waits for a slot no compute will free")
        both = copy_busy and comp_busy
        copy_rate, comp_rate = (copy_shared_rate, comp_shared_rate) if both else (1.0, 1.0)
        dt = min(copy_left / copy_rate if copy_busy else float("inf"),
                 comp_left / comp_rate if comp_busy else float("inf"))
        t += dt
        if copy_busy:
            copy_left -= dt * copy_rate
            if copy_left <= 1e-15:
                jobs[copy_jobs[qi]].copy_end = t
                copy_busy, qi = False, qi + 1
        if comp_busy:
            comp_left -= dt * comp_rate
            if comp_left <= 1e-15:
                jobs[ci].end = t
                comp_busy, ci = False, ci + 1
