"""The policy contract: a PlanRequest in, a predicted Plan out; shared helpers to build and score plans.

Every policy (ours and the peers') is scored by the same simulator, so their numbers compare.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from residency.device.profile import DeviceProfile
from residency.errors import ResidencyError
from residency.formats.dtypes import weights_format  # noqa: F401 (the peers import it from here)
from residency.plan import BlockPlan, Budget, Execution, Plan
from residency.plan.plan import COMPUTE_DTYPES
from residency.simulate import predict
from residency.units import fmt_bytes
from residency.validate import a_type
from residency.workload import Workload

# A policy's note on the execution modes it runs starts with this, so a plan re-moded by another policy (ours
# takes a rival's placement at its own modes) can drop it, as it drops build_plan's device-memory verdict
# (is_device_miss): graph pools change that one.
MODE_NOTE_PREFIX = "execution modes: "
MILP_NODE_LIMIT = 1000  # see PlanOptions.milp_node_limit; measured on the catalog models, tools/bench_policies.py


@dataclass(frozen=True)
class PlanOptions:
    """How a plan is searched and scored; the defaults are what `residency plan` and `residency run` use."""

    bound: bool = True  # compute the plan's lower bound (an LP each): our planner skips it for its candidates
    # HiGHS branch-and-bound nodes per MILP solve of our planner (search, gap statement, no-fit fallback).
    # Planning is bounded by work, never by wall time, so the same request gives the same plan under any
    # machine load. None: every solve runs to its optimality gap (slower on the largest models).
    milp_node_limit: int | None = MILP_NODE_LIMIT


@dataclass(frozen=True)
class PlanRequest:
    """What a policy plans for: workload, device profile, budget (bytes, ms) and dtypes."""
    workload: Workload  # at the generation parameters to plan for (steps, context frames)
    profile: DeviceProfile
    budget: Budget  # VRAM bytes the plan may use; ms per latent frame (None: fastest that fits)
    sensitivity: Mapping[str, Mapping[str, float]] | None = None  # measured block × format loss, if shipped
    host_bytes_available: int | None = None  # host RAM for the store and pinned ring (None: not limited)
    compute_dtype: str = "bf16"  # what the matmuls run in
    kv_dtype: str | None = None  # None: the workload's default
    options: PlanOptions = field(default=PlanOptions(), compare=False)  # how to search, not what to plan
    # execution mode of the blocks: "auto" (ours picks per block class where the profile has the figures) or one
    # of "eager", "compiled", "graphed" forced on every block (policies.ours.modes); the peers run the modes their
    # documentation gives them among those the request allows (policies.peers._common.allowed_modes). Eager by
    # default: the runtime does not run `graphed` yet, so only `residency plan` asks for "auto"
    exec_mode: str = "eager"
    # seconds of play a compile must repay: `compiled` is chosen only where it saves more than its compile time
    session_s: float = 600.0

    def __post_init__(self) -> None:
        # a library user's mistakes, said here: they raised KeyError 'fp64' or "'str' object has no attribute
        # 'is_gpu'" from deep in a policy. Only names and numbers are refused: tests and tools pass stubs
        for name, value, kind, hint in (
                ("workload", self.workload, Workload, "residency.workload.workload_from_module(model, example, …)"),
                ("profile", self.profile, DeviceProfile, "residency.load_profile('rx-7800-xt') or machine_profile()"),
                ("budget", self.budget, Budget, "residency.plan.Budget(vram_bytes, frame_ms)")):
            if isinstance(value, str | int | float | bytes):  # a name or a number where the object goes
                raise ResidencyError(f"PlanRequest.{name} is {a_type(value)}, not a {kind.__name__}",
                                     hint=f"give one: {hint}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ResidencyError(f"PlanRequest.compute_dtype {self.compute_dtype!r} is not one of "
                                 f"{', '.join(COMPUTE_DTYPES)}", hint="the dtype the matmuls run in, e.g. 'bf16'")
        w = self.workload
        if isinstance(w, Workload) and not any(p.passes for p in w.frame_phases()):  # the simulator's max() of none
            raise ResidencyError(f"workload {w.name}: no phase runs per latent frame (per \"latent_frame\", with a "
                                 "pass): a plan holds a frame, and this workload has none to plan",
                                 hint="add a phase with \"per\": \"latent_frame\" and the passes one frame runs "
                                      "(the catalog's field 'phases')")


PolicyFn = Callable[[PlanRequest], Plan]



@dataclass(frozen=True)
class Replanner:
    """The runtime's replan(budget, profile): the policy again, on the request the first plan came from."""

    policy: Callable[[PlanRequest], Plan]
    request: PlanRequest

    @property
    def profile(self) -> DeviceProfile:
        """The profile the first plan was made for: the runtime re-plans with it."""
        return self.request.profile

    def __call__(self, budget: Budget, profile: DeviceProfile) -> Plan:
        return self.policy(replace(self.request, budget=budget, profile=profile))

def build_plan(req: PlanRequest, policy: str, blocks: Sequence[BlockPlan], execution: Execution,
               notes: Sequence[str] = (), kv_dtype: str | None = None) -> Plan:
    """A Plan for the request with the simulator's prediction and, when it does not fit, a note.

    `req.options.bound = False` skips the lower bound (candidates scored in bulk by our planner)."""
    w = req.workload
    plan = Plan(model=w.name, workload_fingerprint=w.fingerprint(), profile=req.profile.name,
                profile_fingerprint=req.profile.fingerprint(), profile_backend=req.profile.backend, policy=policy,
                budget=req.budget,
                blocks=tuple(_located(w, bp) for bp in blocks), execution=execution,
                kv_dtype=kv_dtype or req.kv_dtype or w.kv_dtype,
                steps=w.steps, context_frames=w.context_frames, notes=tuple(notes))
    plan = predict(w, plan, req.profile, req.sensitivity, bound=req.options.bound)
    if not fits_memory(plan):
        need = plan.prediction.peak_total_bytes
        plan = _with_note(plan, f"does not fit: needs {fmt_bytes(need)} of device memory, budget "
                                f"{fmt_bytes(req.budget.vram_bytes)}")
    return plan


def _located(w: Workload, bp: BlockPlan) -> BlockPlan:
    """`bp` with the module paths and tensor names of its workload block, for readers of the plan JSON."""
    spec = w.by_name.get(bp.name)
    if spec is None:
        return bp  # an unknown block: Plan.check_matches names it when the plan is applied
    return replace(bp, modules=spec.modules or (spec.name,), tensors=tuple(n for n, _ in spec.tensors))


def is_device_miss(note: str) -> bool:
    """True for build_plan's note that the plan does not fit the device memory (not a peer's host-RAM one)."""
    return note.startswith("does not fit: needs ") and " of device memory, budget " in note


def _with_note(plan: Plan, note: str) -> Plan:
    return replace(plan, notes=plan.notes + (note,))


def fits_memory(plan: Plan) -> bool:
    """True when the plan's predicted peak device bytes are within its VRAM budget."""
    return plan.prediction is not None and plan.prediction.peak_total_bytes <= plan.budget.vram_bytes


def uniform_blocks(workload: Workload, placement: str, fmt: str, compute_dtype: str = "bf16",
                   overrides: Mapping[str, str] | None = None, lifetime: str = "session") -> list[BlockPlan]:
    """Every block at one placement and format; `overrides` maps block -> placement."""
    overrides = overrides or {}
    return [BlockPlan(b.name, overrides.get(b.name, placement), fmt, compute_dtype, lifetime)
            for b in workload.blocks]
