"""The static call schedule: every block call of a session start and of one latent frame, from the workload.

A cursor follows the real calls; a call out of order resynchronises it (it is never learned from a pass).
"""

from __future__ import annotations

from dataclasses import dataclass

from residency.plan import Plan
from residency.workload import Workload


@dataclass(frozen=True)
class Call:
    """One expected call of a block in the schedule, with its phase and its streamed ordinal."""
    block: str
    phase: str
    run: int  # index of the phase run within its sequence (a new run starts at each phase change)
    streamed_index: int  # ordinal among the sequence's streamed calls, -1 when the block is not streamed


def _sequence(workload: Workload, plan: Plan, phases) -> tuple[Call, ...]:
    calls: list[Call] = []
    streamed = 0
    for run, ph in enumerate(phases):
        for p in ph.passes:
            for _ in range(workload.count(p)):
                for name in p.blocks:
                    is_streamed = plan.by_name[name].placement == "streamed"
                    calls.append(Call(name, ph.name, run, streamed if is_streamed else -1))
                    streamed += is_streamed
    return tuple(calls)


class CallSchedule:
    """Positions p = 0, 1, … of an endless call stream: the session start, then latent frames forever."""

    def __init__(self, workload: Workload, plan: Plan):
        self.start = _sequence(workload, plan, workload.session_phases())  # once per session
        self.frame = _sequence(workload, plan, workload.frame_phases())  # once per latent frame
        self.start_streamed = sum(c.streamed_index >= 0 for c in self.start)
        self.frame_streamed = sum(c.streamed_index >= 0 for c in self.frame)
        # Positions (within one sequence) of the streamed calls, by their ordinal.
        self._start_pos = [i for i, c in enumerate(self.start) if c.streamed_index >= 0]
        self._frame_pos = [i for i, c in enumerate(self.frame) if c.streamed_index >= 0]
        self._first_in_start = {}
        for i, c in enumerate(self.start):
            self._first_in_start.setdefault(c.block, i)

    def call(self, p: int) -> Call:
        """The call expected at position `p` (the start sequence, then the frame sequence repeated)."""
        n = len(self.start)
        return self.start[p] if p < n else self.frame[(p - n) % len(self.frame)]

    def frame_of(self, p: int) -> int:
        """0 for the session start, 1.. for latent frames (counted since the stream began)."""
        n = len(self.start)
        return 0 if p < n else 1 + (p - n) // len(self.frame)

    def is_frame_start(self, p: int) -> bool:
        """True when position `p` is the first call of a latent frame."""
        return p >= len(self.start) and (p - len(self.start)) % len(self.frame) == 0

    def run_key(self, p: int) -> tuple[int, int]:
        """Identifies one run of one phase: (frame, run index within its sequence)."""
        return self.frame_of(p), self.call(p).run

    def streamed_ordinal(self, p: int) -> int:
        """Streamed calls strictly before position p (the ring's call number of p when p is streamed)."""
        n = len(self.start)
        if p < n:
            return sum(1 for q in self._start_pos if q < p)
        k, r = divmod(p - n, len(self.frame))
        return self.start_streamed + k * self.frame_streamed + sum(1 for q in self._frame_pos if q < r)

    def streamed_position(self, m: int) -> int:
        """Position of the m-th streamed call of the stream (m >= 0); requires streamed calls per frame."""
        if m < self.start_streamed:
            return self._start_pos[m]
        k, r = divmod(m - self.start_streamed, self.frame_streamed)
        return len(self.start) + k * len(self.frame) + self._frame_pos[r]

    def resync(self, p: int, block: str) -> int | None:
        """Where the stream is when `block` is called while position p was expected, or None.

        The first block of a session start means a new session; the first block of a frame means
        a new frame; otherwise the next occurrence within one frame's length ahead; else the
        block's place in the session start. None: the call is outside the schedule.
        """
        if self.start and block == self.start[0].block:
            return 0
        n, f = len(self.start), len(self.frame)
        if f and block == self.frame[0].block and (p >= n or p == 0):
            # p == 0: attached to a session that had already started; its next call begins a frame.
            return n if p < n else p + (-(p - n) % f)  # the next frame start (p itself when it is one)
        for q in range(p + 1, p + 1 + max(f, n)):
            if self.call(q).block == block:
                return q
        return self._first_in_start.get(block)
