"""make_plan(workload, profile, vram=…, fps=…): a policy's plan for a workload on a device, in one call.

The short form of `policies.get_policy(name)(PlanRequest(workload, profile, Budget(...)))`, exported as
`residency.make_plan` (the name `residency.plan` is the plan subpackage). Imported lazily: it loads the planner.
"""

from __future__ import annotations

from collections.abc import Mapping

from policies import PlanOptions, PlanRequest, get_policy
from residency.device import DeviceProfile
from residency.errors import ResidencyError
from residency.formats.dtypes import DTYPE_FORMAT, KV_DTYPE_BYTES
from residency.front_door.vram import VramSpec, frame_budget_ms, vram_bytes
from residency.plan import Budget, Plan
from residency.workload import Workload


def make_plan(workload: Workload, profile: DeviceProfile | str, *, vram: VramSpec = None, fps: float | None = None,
              frame_ms: float | None = None, policy: str = "ours", compute_dtype: str | None = None,
              kv_dtype: str | None = None, sensitivity: Mapping[str, Mapping[str, float]] | None = None,
              options: PlanOptions | None = None) -> Plan:
    """Plan `workload` for `profile` under a VRAM and a time budget with the policy named `policy`.

    vram: bytes (int), a size ("12GiB") or a share of the weights' bytes at `compute_dtype` ("50%"); None:
    the profile's usable device memory. fps (video frames per second) or frame_ms (ms per latent frame):
    the time budget; neither: the fastest plan that fits. policy: "ours" or a peer's name
    (`residency plan --policy`). compute_dtype: "bf16", "fp16" or "fp32", what the matmuls run in; None: what the
    workload was counted in (workload_from_module records it: the model's own dtype), else bf16.
    kv_dtype: None for the workload's own. sensitivity: a measured block × format quality-loss table.
    options: how the search runs (PlanOptions; its defaults are the CLI's).

    profile: a DeviceProfile, a shipped name, a profile file's path (residency.device.resolve_profile), or "auto":
    this machine's, measured once in quick mode and cached (as residency.attach takes it).

    Returns the Plan with the simulator's Prediction. A plan that does not fit the budget is still returned,
    with a note saying so (`policies.fits_memory(plan)` tells). Raises ResidencyError for a bad vram, fps or
    frame_ms, an unknown policy or compute dtype.
    """
    if not isinstance(workload, Workload):  # a model: its workload comes from workload_from_module
        raise ResidencyError(f"make_plan plans a Workload, not a {type(workload).__name__}",
                             hint="residency.workload.workload_from_module(model, example_inputs, name=…), or "
                                  "residency.attach(model, …) to plan and attach at once")
    if isinstance(profile, str) and profile == "auto":  # as residency.attach(profile="auto") means it
        from residency.device import machine_profile

        profile = machine_profile()
    elif not isinstance(profile, DeviceProfile):  # a name or a path, as --profile takes them
        from residency.device import resolve_profile

        profile = resolve_profile(profile)
    if compute_dtype is None:
        counted = workload.extra.get("compute_dtype") if isinstance(workload.extra, dict) else None
        compute_dtype = counted if counted in DTYPE_FORMAT else "bf16"
    if compute_dtype not in DTYPE_FORMAT:
        raise ResidencyError(f"compute_dtype={compute_dtype!r}", hint="one of: " + ", ".join(DTYPE_FORMAT))
    if kv_dtype is not None and kv_dtype not in KV_DTYPE_BYTES:
        raise ResidencyError(f"kv_dtype={kv_dtype!r}", hint="one of: " + ", ".join(KV_DTYPE_BYTES) + ", or None")
    weight_bytes = workload.nbytes(DTYPE_FORMAT[compute_dtype])
    budget = Budget(vram_bytes(vram, weight_bytes, profile.memory_usable_bytes),
                    frame_budget_ms(fps, frame_ms, workload.video_frames_per_latent))
    request = PlanRequest(workload, profile, budget, sensitivity=sensitivity, compute_dtype=compute_dtype,
                          kv_dtype=kv_dtype, options=options or PlanOptions())
    return get_policy(policy)(request)


__all__ = ["make_plan"]
