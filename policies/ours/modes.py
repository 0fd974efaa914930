"""The execution mode of each block class (BlockPlan.exec_mode): eager, compiled or graphed, and why.

A mode changes only a block's launch (GPU) or dispatch (CPU) cost, never its placement's, so it is chosen per
block class before the placement search, on the compute of the class's blocks resident, and the MILP then
plans with that compute. `graphed` is taken wherever it is faster (a capture costs milliseconds, once per
class and slot); `compiled` only where the time it saves over a session of PlanRequest.session_s exceeds
its compile time (compile_s_per_block_class, once per machine: inductor caches it on disk). A mode whose
figure the profile lacks is not offered; the CPU has no graphs. Blocks used only at session start stay eager:
one call never repays a compile. This choice is made when PlanRequest.exec_mode is "auto" (`residency plan`'s
default) among eager and compiled — the CUDA/ROCm runtime captures graphed blocks (residency/runtime/graphed.py)
but that path has not yet run on a GPU, so "auto" does not choose it — or "auto+graphed" among all three
(`tools/bench_modes.py`, labelled simulated). Any other value forces that mode
on every block ("eager", the request's default, is the plan of before modes existed).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from policies.base import PlanRequest, weights_format
from residency.errors import ResidencyError, UsageError
from residency.plan import BlockPlan
from residency.plan.plan import EXEC_MODES
from residency.simulate.costs import compute_s
from residency.workload import BlockSpec, Workload

REQUEST_MODES = ("auto", "auto+graphed", *EXEC_MODES)
RUNNABLE_MODES = ("eager", "compiled")  # what "auto" picks from; "graphed" (GPU runtime, unverified) on request
# A graphed class holds a private pool (its activations + graph_pool_bytes_per_class) for the whole session:
# not worth it for less than 0.1 ms per latent frame.
MIN_GRAPH_SAVING_S = 1e-4


@dataclass(frozen=True)
class ModeChoice:
    """The mode of one block class and the sentence that says why (empty when eager by default)."""
    mode: str
    note: str = ""


def supported_modes(req: PlanRequest) -> tuple[str, ...]:
    """The modes the request's backend can run: eager and compiled everywhere, graphed on a GPU only."""
    return EXEC_MODES if req.profile.is_gpu else ("eager", "compiled")


def check_request_mode(req: PlanRequest) -> None:
    """Raises ResidencyError when the request forces a mode its backend cannot run (graphed on the CPU)."""
    if req.exec_mode not in REQUEST_MODES:
        raise ResidencyError(f"exec mode {req.exec_mode!r} is not one of {', '.join(REQUEST_MODES)}")
    if req.exec_mode not in ("auto", "auto+graphed") and req.exec_mode not in supported_modes(req):
        # a flag the profile cannot take: a usage error (exit 2), as any conflicting pair of options
        raise UsageError(f"exec mode {req.exec_mode!r} needs a GPU; profile {req.profile.name!r} is "
                         f"{req.profile.backend}", hint="use --exec-mode eager, compiled or auto")


def frame_compute_s(w: Workload, b: BlockSpec, bp: BlockPlan, req: PlanRequest, kv_dtype: str) -> float:
    """Seconds of `b`'s compute per latent frame under `bp` (every call of every frame pass)."""
    total = 0.0
    for ph in w.frame_phases():
        for p in ph.passes:
            if b.name in p.blocks:
                total += w.count(p) * compute_s(b, bp, req.profile, w.context_frames, p.kv != "none", kv_dtype,
                                                w.batch)
    return total


def _class_frame_s(req: PlanRequest, members: list[BlockSpec], mode: str, kv_dtype: str) -> float:
    """The class's compute per frame, every member resident at full precision in `mode`."""
    fmt = weights_format(req.compute_dtype)
    return sum(frame_compute_s(req.workload, b, BlockPlan(b.name, "resident", fmt, req.compute_dtype,
                                                          exec_mode=mode), req, kv_dtype) for b in members)


def _frames_per_session(req: PlanRequest, eager_frame_s: float, fastest_frame_s: float) -> float:
    """Latent frames a session of session_s seconds runs: at the frame budget, else at the eager compute — never
    faster than the fastest compute any mode allows (a budget below it is missed: counting its frames would credit
    a compile with savings over frames that never run, "saves 57600000000 s over a 600 s session")."""
    frame_s = req.budget.frame_ms / 1e3 if req.budget.frame_ms else eager_frame_s
    frame_s = max(frame_s, fastest_frame_s)
    return req.session_s / frame_s if frame_s > 0 else 0.0


def _class_mode_s(req: PlanRequest, members: list[BlockSpec], eager_s: float, kv_dtype: str) -> dict[str, float]:
    """The class's compute per frame in each mode the request and profile can cost: eager, graphed (auto+graphed
    on a profile with graph figures), compiled (a profile with compile figures)."""
    p, out = req.profile, {"eager": eager_s}
    if req.exec_mode == "auto+graphed" and "graphed" in supported_modes(req) and p.graph_known():
        out["graphed"] = _class_frame_s(req, members, "graphed", kv_dtype)
    if p.compiled_known() and p.compile_s_per_block_class > 0:
        out["compiled"] = _class_frame_s(req, members, "compiled", kv_dtype)
    return out


def choose_modes(req: PlanRequest, kv_dtype: str) -> dict[str, ModeChoice]:
    """Block class ("dit.blocks.*") -> its mode and why. Classes run only at session start stay eager (auto).

    Cost: three compute estimates per block.
    """
    w = req.workload
    classes: dict[str, list[BlockSpec]] = {}
    for b in w.blocks:
        classes.setdefault(b.block_class, []).append(b)
    if not req.exec_mode.startswith("auto"):
        unrun = " (simulated: the runtime does not run graphed blocks yet)" if req.exec_mode == "graphed" else ""
        # one note for the plan, on its first class, not one per class saying the same thing
        note = f"every block {req.exec_mode}: forced by --exec-mode{unrun}" if req.exec_mode != "eager" else ""
        return {c: ModeChoice(req.exec_mode, note if i == 0 else "") for i, c in enumerate(classes)}
    frame_classes = {c: m for c, m in classes.items() if any(w.calls_per_frame(b.name) for b in m)}
    mode_s = {c: _class_mode_s(req, m, _class_frame_s(req, m, "eager", kv_dtype), kv_dtype)
              for c, m in frame_classes.items()}
    frames = _frames_per_session(req, sum(s["eager"] for s in mode_s.values()),
                                 sum(min(s.values()) for s in mode_s.values()))
    out = {c: ModeChoice("eager") for c in classes}
    for c in frame_classes:
        out[c] = _choose_class(req, c, mode_s[c], frames)
    return out


def _dur(seconds: float) -> str:
    """A per-frame time in a note: ms to 0.1, µs below 0.1 ms (a small class read "0.0 → 0.0 ms")."""
    return f"{seconds * 1e3:.1f} ms" if seconds >= 1e-4 else f"{seconds * 1e6:.0f} µs"


def _choose_class(req: PlanRequest, name: str, mode_s: dict[str, float], frames: float) -> ModeChoice:
    """The fastest mode the profile can cost for one class (`mode_s`: _class_mode_s); compiled only when it repays
    its compile."""
    p = req.profile
    eager_s = mode_s["eager"]
    best = ModeChoice("eager")
    best_s = eager_s
    graphed_s = mode_s.get("graphed")
    unit = req.workload.frame_unit()
    if graphed_s is not None and eager_s - graphed_s >= MIN_GRAPH_SAVING_S:
        best, best_s = ModeChoice("graphed", f"{name} graphed: launch-bound {_dur(eager_s)} → "
                                  f"{_dur(graphed_s)} per {unit}"), graphed_s
    compiled_s = mode_s.get("compiled")
    if compiled_s is not None:
        saved_s = (eager_s - compiled_s) * frames  # over the session
        if compiled_s < best_s and saved_s > p.compile_s_per_block_class:
            best = ModeChoice("compiled", f"{name} compiled: {_dur(eager_s)} → {_dur(compiled_s)} per {unit} "
                              f"saves {saved_s:.0f} s over a {req.session_s:.0f} s session, compiling "
                              f"takes {p.compile_s_per_block_class:.0f} s once (cached on disk)")
        elif compiled_s < best_s:
            best = replace(best, note=best.note or (
                f"{name} eager: compiling ({p.compile_s_per_block_class:.0f} s) would save only {saved_s:.1f} s "
                f"over a {req.session_s:.0f} s session"))
    return best


def with_modes(blocks: list[BlockPlan], choices: dict[str, ModeChoice], w: Workload) -> list[BlockPlan]:
    """`blocks` with each block's exec_mode set to its class's choice."""
    return [replace(bp, exec_mode=choices[w.by_name[bp.name].block_class].mode) if bp.name in w.by_name else bp
            for bp in blocks]


def mode_notes(choices: dict[str, ModeChoice], blocks: list[BlockPlan] | tuple[BlockPlan, ...],
               w: Workload) -> list[str]:
    """The notes of the classes `blocks` run in the mode chosen for them (a rival's eager plan: none)."""
    used = {w.by_name[bp.name].block_class: bp.exec_mode for bp in blocks if bp.name in w.by_name}
    return [ch.note for c, ch in choices.items() if ch.note and used.get(c) == ch.mode]


__all__ = ["REQUEST_MODES", "RUNNABLE_MODES", "ModeChoice", "check_request_mode", "choose_modes", "mode_notes", "supported_modes",
           "with_modes"]
