"""The KV cache's storage dtype is the plan's: the planner stores it in FP8 where nothing fits otherwise, and the
runtime's sessions then store it so (they built it from the pipeline's config, and a plan that fit at FP8 ran out
of its budget at the first step)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sim_helpers import flat_profile
from test_runtime import tiny_plan

from pipelines.world_model import WorldModelPipeline
from pipelines.world_model.workload import catalog_entry
from policies import PlanRequest, get_policy
from policies.base import fits_memory
from residency.plan import Budget
from residency.runtime import Runtime
from residency.simulate import predict
from residency.workload import workload_from_dict

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def test_a_plan_with_an_fp8_kv_cache_runs_within_its_budget_and_detach_gives_the_config_back():
    torch.manual_seed(0)
    pipe = WorldModelPipeline.from_config("tiny")
    w = workload_from_dict(catalog_entry("tiny"))
    profile = flat_profile(backend="cpu")
    plan = dataclasses.replace(tiny_plan(w, "streamed"), kv_dtype="fp8")
    need = predict(w, plan, profile, bound=False).prediction.peak_total_bytes
    assert need < predict(w, tiny_plan(w, "streamed"), profile, bound=False).prediction.peak_total_bytes
    plan = dataclasses.replace(plan, budget=Budget(need))  # too small for the cache at bf16
    config = pipe.config
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rt = Runtime(plan, "cpu", workload=w).attach(pipe)
    try:
        s = pipe.start(image, seed=0)
        for action in ("up", "left", "idle"):
            rt.step(s, action)
        assert s.cache.storage_dtype == torch.float8_e4m3fn
        assert rt.ledger.peak_total_bytes <= need
    finally:
        rt.detach()
    assert pipe.config is config and pipe.config.kv_dtype == "bf16"


def test_nothing_fitting_with_the_workloads_kv_dtype_falls_back_to_fp8_for_the_rivals_plans_too():
    # only a plan streaming tensor by tensor (a rival's; the MILP does not model it) fits, and only with the cache
    # at FP8: the search tried FP8 for its own plans alone and said "does not fit"
    w = workload_from_dict(catalog_entry("tiny"))
    profile = flat_profile(backend="cpu")
    ours = get_policy("ours")
    at_fp8 = ours(PlanRequest(w, profile, Budget(2**34), kv_dtype="fp8", compute_dtype="fp32"))
    least = {kv: get_policy("accelerate-sequential")(PlanRequest(w, profile, Budget(2**34), kv_dtype=kv,
                                                                 compute_dtype="fp32"))
             for kv in ("bf16", "fp8")}
    lo, hi = (least[kv].prediction.peak_total_bytes for kv in ("fp8", "bf16"))
    assert lo < hi and at_fp8.kv_dtype == "fp8"
    plan = ours(PlanRequest(w, profile, Budget((lo + hi) // 2), compute_dtype="fp32"))
    assert fits_memory(plan) and plan.kv_dtype == "fp8"
    assert any("KV cache stored as fp8 (e4m3): nothing fits with bf16" in n for n in plan.notes)


def test_a_models_own_kv_dtype_field_is_left_alone_where_no_kv_cache_is_planned():
    # any root with a dataclass config naming kv_dtype had it replaced by the plan's (bf16), the model reading it
    from torch import nn

    import residency

    @dataclasses.dataclass(frozen=True)
    class Config:
        kv_dtype: str = "fp16"

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = Config()
            self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    model = Net().eval()
    config = model.config
    with residency.attach(model, vram="60%", profile=flat_profile(backend="cpu"), backend="cpu",
                          example_inputs=torch.randn(2, 32)), torch.inference_mode():
        assert model.config is config
        model(torch.randn(2, 32))
    assert model.config is config
