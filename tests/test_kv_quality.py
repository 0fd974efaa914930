"""The KV cache's dtype in the plan's quality loss, and the planner's choice of it: FP8 where it plans better (the
cache's memory lent to the weights, its reads halved), not only where nothing else fits."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
from PIL import Image
from sim_helpers import flat_profile
from test_runtime import tiny_plan

from pipelines.world_model.workload import catalog_entry
from policies import PlanRequest, get_policy
from policies.base import fits_memory
from residency import cli
from residency.commands.sources import resolve_workload
from residency.device import resolve_profile
from residency.plan import Budget
from residency.simulate import predict
from residency.simulate.quality import KV_SENSITIVITY_KEY, kv_dtype_error, kv_loss, quality_loss, weights_loss
from residency.workload import workload_from_dict


def test_kv_dtype_error_is_zero_where_the_dtype_holds_the_cache_and_grows_as_mantissa_bits_fall():
    for held in ("bf16", "fp16"):
        assert kv_dtype_error(held, held) == 0.0
        assert kv_dtype_error("fp32", held) == 0.0
    # bf16 (8 significant bits) into fp8 e4m3 (4): about 2^-4 relative rounding, far above bf16's own 2^-8
    fp8 = kv_dtype_error("fp8", "bf16")
    assert 2**-8 < fp8 < 2**-3
    # fp16 holds 11 bits but a narrower range: what it rounds of fp32 values is far below fp8's
    assert 0 < kv_dtype_error("fp16", "fp32") < fp8 / 10


def test_the_plans_quality_loss_adds_the_caches_loss_at_its_dtype_and_only_where_a_cache_is_planned():
    w = workload_from_dict(catalog_entry("tiny"))
    profile = flat_profile(backend="cpu")
    plan = tiny_plan(w, "streamed")
    assert w.kv_cache_bytes() and plan.kv_dtype == w.kv_dtype
    at_fp8 = dataclasses.replace(plan, kv_dtype="fp8")
    assert quality_loss(w, plan) == weights_loss(w, plan)  # the workload's own dtype costs nothing
    assert quality_loss(w, at_fp8) == pytest.approx(weights_loss(w, plan) + kv_loss(w, "fp8"))
    assert kv_loss(w, "fp8") > 0
    # the prediction carries it
    a, b = (predict(w, p, profile, bound=False).prediction.quality_loss for p in (plan, at_fp8))
    assert b - a == pytest.approx(kv_loss(w, "fp8"))
    # a measured row replaces the proxy
    measured = {KV_SENSITIVITY_KEY: {"fp8": 0.5}}
    assert kv_loss(w, "fp8", measured) == 0.5
    assert quality_loss(w, at_fp8, measured) == pytest.approx(weights_loss(w, plan, measured) + 0.5)
    # a workload without a cache: no term, whatever the plan's field says
    no_cache = dataclasses.replace(w, context_frames=0)
    assert not no_cache.kv_cache_bytes()
    assert quality_loss(no_cache, at_fp8) == weights_loss(no_cache, at_fp8)


def test_the_proxy_scales_with_the_share_of_weights_the_k_and_v_projections_hold():
    # lucid-800m has lucid-500m's attention (same K+V channels) in bigger blocks: a smaller share, a smaller loss
    small, big = resolve_workload("lucid-500m"), resolve_workload("lucid-800m")
    per_block = [kv_loss(w, "fp8") / sum(1 for b in w.blocks if b.kv_channels_per_token) for w in (small, big)]
    assert per_block[1] < per_block[0]
    ratio = min(b.params for b in small.blocks if b.kv_channels_per_token) / min(
        b.params for b in big.blocks if b.kv_channels_per_token)
    assert per_block[1] / per_block[0] == pytest.approx(ratio, rel=0.05)


@pytest.fixture(scope="module")
def lucid_requests():
    w = resolve_workload("lucid-500m")
    profile = resolve_profile("rx-7800-xt")
    return lambda mib, kv=None, frame_ms=100.0: PlanRequest(w, profile, Budget(mib * 2**20, frame_ms),
                                                            compute_dtype="bf16", kv_dtype=kv)


@pytest.fixture(scope="module")
def lucid_plans(lucid_requests):
    """ours' plan of lucid-500m on the RX 7800 XT at 100 ms, per (MiB, KV dtype); each planned once (seconds each)."""
    made = {}

    def plan(mib, kv=None):
        if (mib, kv) not in made:
            made[mib, kv] = get_policy("ours")(lucid_requests(mib, kv))
        return made[mib, kv]

    return plan


def test_an_fp8_cache_is_chosen_where_it_plans_better_and_a_pinned_dtype_is_kept(lucid_plans):
    # lucid-500m on the 16 GB card, 600 MiB, 100 ms: at BF16 the cache leaves the weights room for loss 1.32 only;
    # at FP8 the plan holds the budget at a third of that, the cache's own loss included
    chosen, pinned = lucid_plans(600), lucid_plans(600, "bf16")
    assert pinned.kv_dtype == "bf16" and chosen.kv_dtype == "fp8"
    assert fits_memory(chosen) and chosen.prediction.frame_ms <= 100.0
    assert chosen.prediction.quality_loss < pinned.prediction.quality_loss
    note = next(n for n in chosen.notes if n.startswith("KV cache stored as fp8"))
    assert f"{pinned.prediction.quality_loss:.3g} with bf16" in note


def test_a_plan_at_fp8_because_nothing_else_fits_is_not_searched_at_fp8_again(lucid_requests, monkeypatch):
    # 450 MiB: nothing fits with BF16, so the search is at FP8 already; the alternative searched it a second time
    import policies.ours as ours_module

    searched = []
    real = ours_module._placed_at
    monkeypatch.setattr(ours_module, "_placed_at", lambda req, *a: searched.append(req.kv_dtype) or real(req, *a))
    plan = get_policy("ours")(lucid_requests(450))
    assert plan.kv_dtype == "fp8" and any(n.endswith("nothing fits with bf16") for n in plan.notes)
    assert searched == [None]


def test_a_larger_budget_never_plans_a_worse_quality_across_the_kv_switch(lucid_plans):
    # BF16 wherever it fitted: 450 MiB fell back to FP8 and held 100 ms, while 480 and 500 MiB, where BF16 fitted,
    # kept it and missed the budget (434 and 110 ms); compared as made, more memory never plans worse
    losses = []
    for mib in (450, 480, 500, 600):
        plan = lucid_plans(mib)
        assert fits_memory(plan) and plan.prediction.frame_ms <= 100.0, mib
        losses.append(plan.prediction.quality_loss)
    assert all(b <= a * (1 + 1e-3) for a, b in itertools.pairwise(losses)), losses


def test_plan_kv_dtype_option_pins_the_cache_and_a_conflicting_plan_file_is_refused(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "tiny", "--profile", "rx-7800-xt", "--vram", "200MiB", "--kv-dtype", "fp8",
                     "-o", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["plan", "tiny", "--profile", "rx-7800-xt", "--kv-dtype", "bf16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_dtype"] == "bf16"
    image = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    code = cli.main(["run", "tiny", "--image", str(image), "--plan", str(out), "--kv-dtype", "bf16", "--frames", "1",
                     "-o", str(tmp_path / "o.gif")])
    err = capsys.readouterr().err
    assert code == 2
    assert "--kv-dtype bf16" in err and "fp8" in err and "hint:" in err
    assert not (tmp_path / "o.gif").exists()


def test_re_plans_of_an_attached_world_model_keep_the_kv_dtype_its_sessions_were_built_in():
    # a re-plan (a budget cut, the closed loop) free to pick the other dtype gave a plan switch_plan must refuse
    import residency
    from pipelines.world_model import WorldModelPipeline

    pipe = WorldModelPipeline.from_config("tiny")
    with residency.attach(pipe, vram="60%", profile=flat_profile(backend="cpu"), backend="cpu") as rt:
        assert rt.replan is not None and rt.replan.request.kv_dtype == rt.plan.kv_dtype
        again = rt.replan(Budget(rt.plan.budget.vram_bytes // 2, None), rt.profile)
        assert again.kv_dtype == rt.plan.kv_dtype
