"""tools/bench_policies.py's bound over a session: compile time counted, it stays below every mode choice's."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from sim_helpers import linear_block
from test_exec_modes import _launch_bound_gpu

from policies import PlanRequest, get_policy
from residency.plan import Budget
from residency.simulate import lower_bound_s
from residency.workload import PassSpec, PhaseSpec, Workload
from tools.bench_policies import session_bound_ms, session_ms


def _workload() -> Workload:
    """Two block classes in two frame phases: three DiT blocks per step, two VAE layers per frame."""
    dit = tuple(linear_block(f"dit.blocks.{i}", 1024, 64) for i in range(3))
    vae = tuple(linear_block(f"vae.layers.{i}", 512, 256, "vae") for i in range(2))
    phases = (PhaseSpec("denoise", "latent_frame", (PassSpec(tuple(b.name for b in dit), per_step=True),)),
              PhaseSpec("decode", "latent_frame", (PassSpec(tuple(b.name for b in vae)),)))
    return Workload("two-classes", (*dit, *vae), phases, steps=4, context_frames=0)


@pytest.mark.parametrize("compile_s", [0.0, 0.05, 1.0, 1e6])
def test_no_choice_of_compiled_classes_beats_the_session_bound(compile_s):
    work = _workload()
    profile = _launch_bound_gpu(compile_s_per_block_class=compile_s)
    req = PlanRequest(work, profile, Budget(3 * 2**30), exec_mode="auto")
    ours = get_policy("ours")(req)
    frames = req.session_s / (ours.prediction.frame_ms / 1e3)
    bound = session_bound_ms(req, ours)
    classes = sorted({b.block_class for b in work.blocks})
    best = float("inf")
    for compiled in itertools.chain.from_iterable(itertools.combinations(classes, k) for k in range(3)):
        modes = tuple(dataclasses.replace(bp, exec_mode="compiled" if work.by_name[bp.name].block_class in compiled
                                          else "eager") for bp in ours.blocks)
        at = dataclasses.replace(ours, blocks=modes)
        best = min(best, lower_bound_s(work, at, profile) * 1e3 + len(compiled) * compile_s * 1e3 / frames)
    assert bound <= best * (1 + 1e-9)
    assert session_ms(req, ours, ours) >= bound * (1 - 1e-9)
    every = dataclasses.replace(ours, blocks=tuple(dataclasses.replace(bp, exec_mode="compiled") for bp in ours.blocks))
    eager = dataclasses.replace(ours, blocks=tuple(dataclasses.replace(bp, exec_mode="eager") for bp in ours.blocks))
    if compile_s == 0:  # compiling is free: the bound over modes
        assert bound == pytest.approx(lower_bound_s(work, every, profile) * 1e3)
    if compile_s == 1e6:  # no compile repays: the eager bound
        assert bound == pytest.approx(lower_bound_s(work, eager, profile) * 1e3)
