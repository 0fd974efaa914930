"""The peers' policies reproduce their documented placement and overlap (their sources: the docstrings of `policies/peers/*.py`) on a hand-made
world model: a 2-block encoder once per session, a 6-block DiT every step, a 2-block decoder every frame."""

import sys
from dataclasses import replace

import pytest
from sim_helpers import chain_workload, flat_profile

from policies.base import PlanRequest
from policies.peers import PEERS, comfyui_partial, flexgen_lp, forge
from policies.peers._common import allowed_modes, inference_bytes
from residency.device.profile import EXEC_MODE_FIELDS, Provenance
from residency.errors import ResidencyError
from residency.plan import Budget
from residency.simulate import predict
from residency.workload import BlockSpec, PassSpec, PhaseSpec, Workload

U = 64 * 2**20  # one size unit: a 32768×1024 BF16 matrix
GIB = 2**30
DIT_UNITS = (1, 4, 2, 6, 3, 5)  # different sizes, so largest-first and smallest-first differ
ENC_UNITS, DEC_UNITS = (2, 2), (3, 1)
STEPS = 2
LINK_GBPS = 10.0
COPY_MS_PER_U = U / (LINK_GBPS * 1e9) * 1e3
DIT_TOKENS = 50  # at 1 TFLOP/s a DiT call computes for half its block's copy time: 2·U/2·50 FLOPs per U


def block(name: str, component: str, units: int, tokens: int, kv: bool = False) -> BlockSpec:
    rows = units * U // (1024 * 2)
    return BlockSpec(name=name, component=component, tensors=(("w", (rows, 1024)),), tokens=tokens,
                     flops_per_token=2.0 * rows * 1024, kv_channels_per_token=64 if kv else 0,
                     context_tokens_per_frame=tokens if kv else 0, activation_bytes_per_token=4096)


def world_model() -> Workload:
    enc = tuple(block(f"enc.{i}", "encoder", u, 64) for i, u in enumerate(ENC_UNITS))
    dit = tuple(block(f"dit.{i}", "dit", u, DIT_TOKENS, kv=True) for i, u in enumerate(DIT_UNITS))
    dec = tuple(block(f"dec.{i}", "decoder", u, 1) for i, u in enumerate(DEC_UNITS))
    def names(blocks):
        return tuple(b.name for b in blocks)

    phases = (PhaseSpec("encode", "session", (PassSpec(names(enc)),)),
              PhaseSpec("denoise", "latent_frame", (PassSpec(names(dit), per_step=True, kv="read"),)),
              PhaseSpec("decode", "latent_frame", (PassSpec(names(dec)),)))
    return Workload(name="peers-toy", blocks=enc + dit + dec, phases=phases, steps=STEPS, context_frames=2)


def cpu_profile(**kw):
    """Flat rates; CPU backend so no GPU workspace is counted and budgets stay hand-checkable."""
    return replace(flat_profile(link_gbps=LINK_GBPS, tflops=1.0, **kw), backend="cpu")


def request(vram_bytes: int, profile=None, **kw) -> PlanRequest:
    return PlanRequest(workload=world_model(), profile=profile or cpu_profile(), budget=Budget(int(vram_bytes)),
                       **kw)


def placements(plan) -> dict[str, str]:
    return {b.name: b.placement for b in plan.blocks}


def resident_set(plan) -> set[str]:
    return {b.name for b in plan.blocks if b.placement == "resident"}


def does_not_fit(plan) -> bool:
    return any(n.startswith("does not fit") for n in plan.notes)


def test_peers_are_registered_in_report_order():
    assert list(PEERS) == ["all-resident", "accelerate-sequential", "diffusers-model-offload",
                           "diffusers-group-offload", "comfyui-partial", "forge", "flexgen-lp"]


def test_all_resident_keeps_every_block_at_the_compute_format():
    plan = PEERS["all-resident"](request(64 * U))
    assert set(placements(plan).values()) == {"resident"}
    assert {b.format for b in plan.blocks} == {"BF16"}
    assert not does_not_fit(plan)
    assert plan.prediction.link_bytes_per_frame == 0


def test_all_resident_does_not_fit_a_small_budget_and_says_so():
    plan = PEERS["all-resident"](request(10 * U))
    assert set(placements(plan).values()) == {"resident"}  # reported as it is, never adjusted
    assert does_not_fit(plan)


def test_fp16_compute_keeps_weights_at_f16():
    plan = PEERS["all-resident"](request(64 * U, compute_dtype="fp16"))
    assert {(b.format, b.compute_dtype) for b in plan.blocks} == {("F16", "fp16")}


def test_accelerate_streams_every_tensor_synchronously_from_pageable_memory():
    plan = PEERS["accelerate-sequential"](request(64 * U))
    ex = plan.execution
    assert set(placements(plan).values()) == {"streamed"}
    assert (ex.copy_mode, ex.prefetch_depth, ex.per_tensor_copies, ex.pinned) == ("sync", 0, True, False)
    # Nothing overlaps: a frame is every copy plus every compute, one after the other.
    dit_u, dec_u = sum(DIT_UNITS), sum(DEC_UNITS)
    copy_ms = (STEPS * dit_u + dec_u) * COPY_MS_PER_U
    compute_ms = STEPS * dit_u * COPY_MS_PER_U / 2 + dec_u * COPY_MS_PER_U / 2 / DIT_TOKENS
    assert plan.prediction.frame_ms == pytest.approx(copy_ms + compute_ms, rel=1e-6)


def test_model_offload_swaps_whole_components_per_phase():
    plan = PEERS["diffusers-model-offload"](request(64 * U))
    assert set(placements(plan).values()) == {"resident"}
    assert {b.lifetime for b in plan.blocks} == {"phase"}
    assert (plan.execution.copy_mode, plan.execution.pinned) == ("sync", False)
    # The DiT and the decoder evict each other, so both reload every latent frame.
    assert plan.prediction.link_bytes_per_frame == (sum(DIT_UNITS) + sum(DEC_UNITS)) * U
    assert not does_not_fit(plan)


def test_model_offload_keeps_a_component_alone_in_the_frame_loop():
    work = chain_workload(n=3)
    req = PlanRequest(workload=work, profile=cpu_profile(), budget=Budget(2**30))
    plan = PEERS["diffusers-model-offload"](req)
    assert {b.lifetime for b in plan.blocks} == {"session"}
    assert plan.prediction.link_bytes_per_frame == 0


def test_model_offload_does_not_fit_when_its_largest_component_does_not():
    plan = PEERS["diffusers-model-offload"](request(sum(DIT_UNITS) * U - 1))
    assert does_not_fit(plan)


def test_group_offload_streams_everything_one_block_ahead_from_pinned_memory():
    profile = cpu_profile(launch_us=4.0)
    plan = PEERS["diffusers-group-offload"](request(64 * U, profile=profile))
    ex = plan.execution
    assert set(placements(plan).values()) == {"streamed"}
    assert (ex.copy_mode, ex.prefetch_depth, ex.lookahead_from_compute_start, ex.pinned) == ("async", 1, True, True)
    assert ex.host_sync_per_onload_us == pytest.approx(40.0)
    assert any("host RAM" in n for n in plan.notes)
    assert not does_not_fit(plan)


def test_group_offload_does_not_fit_when_host_ram_cannot_hold_two_copies():
    model_bytes = (sum(ENC_UNITS) + sum(DIT_UNITS) + sum(DEC_UNITS)) * U
    roomy = PEERS["diffusers-group-offload"](request(64 * U, host_bytes_available=2 * model_bytes))
    short = PEERS["diffusers-group-offload"](request(64 * U, host_bytes_available=2 * model_bytes - 1))
    assert not does_not_fit(roomy)
    assert does_not_fit(short)
    assert placements(short) == placements(roomy)  # not adjusted to fit


def test_comfyui_keeps_the_largest_blocks_within_its_weight_budget():
    # free − max(0.8 GiB + reserve, inference) = 12.5 U. Largest first, skipping what would reach it:
    # dit.3 (6) → 6, dit.5 (5) → 11, then 4, 3, 3, 2, 2, 2 all reach 12.5; dit.0 (1) → 12; dec.1 (1) → 13 no.
    req = request(int(0.8 * GIB) + 12.5 * U)
    assert inference_bytes(req) < 0.8 * GIB
    assert comfyui_partial.weight_budget(req) == pytest.approx(12.5 * U, abs=1)
    plan = PEERS["comfyui-partial"](req)
    assert resident_set(plan) == {"dit.3", "dit.5", "dit.0"}
    ex = plan.execution
    assert (ex.copy_mode, ex.prefetch_depth, ex.lookahead_from_compute_start, ex.pinned) == ("async", 1, True, False)


def test_comfyui_subtracts_the_profile_reserve_with_the_minimum_inference_memory():
    profile = replace(cpu_profile(), memory_reserve_bytes=4 * U)
    req = request(int(0.8 * GIB) + 12.5 * U, profile=profile)
    assert comfyui_partial.weight_budget(req) == pytest.approx(8.5 * U, abs=1)
    # 6 → 6, 5 → 11 no, …, 2 → 8, 1 → 9 no: the biggest that stay under 8.5 U.
    assert resident_set(PEERS["comfyui-partial"](req)) == {"dit.3", "enc.0"}


def test_forge_keeps_the_smallest_blocks_first():
    # available = 16.25 U → budget = max(16.25/1.3, 16.25 U − 1.25 GiB) = 12.5 U.
    # Smallest first: 1, 1, 2, 2, 2, 3 → 11; the next 3 would reach 14.
    req = request(16.25 * U + inference_bytes(request(64 * U)))
    assert forge.gpu_weights_budget(req) == pytest.approx(12.5 * U, rel=1e-6)
    plan = PEERS["forge"](req)
    assert resident_set(plan) == {"dit.0", "dec.1", "enc.0", "enc.1", "dit.2", "dit.4"}
    streamed = plan.streamed()
    assert streamed and {b.dequant_on for b in streamed} == {"copy"}
    assert (plan.execution.prefetch_depth, plan.execution.pinned) == (1, True)


def test_forge_and_comfyui_differ_on_the_same_budget():
    req = request(int(0.8 * GIB) + 12.5 * U)
    assert resident_set(PEERS["forge"](req)) != resident_set(PEERS["comfyui-partial"](req))


def test_flexgen_keeps_everything_resident_when_it_fits():
    req = request(64 * U)
    assert flexgen_lp.solve_fractions(req) == {}
    plan = PEERS["flexgen-lp"](req)
    assert set(placements(plan).values()) == {"resident"}


def test_flexgen_streams_the_dit_until_its_copy_equals_its_compute():
    # 29 U of weights; the LP reserves two slots of the largest block (12 U). With 24.5 U it must
    # stream 16.5 U: the encoder (4 U, free per frame), the DiT up to where a layer's copy equals its
    # compute (half of 21 U: the copy of a whole DiT block takes twice its compute), then the decoder
    # (run once a frame, so cheaper than the DiT's `steps` runs) for the remaining 2 U.
    req = request(24.5 * U + inference_bytes(request(64 * U)))
    fractions = flexgen_lp.solve_fractions(req)
    assert fractions["encoder"] == pytest.approx(1.0)
    assert fractions["dit"] == pytest.approx(0.5, abs=1e-6)
    assert fractions["decoder"] == pytest.approx(0.5, abs=1e-6)
    plan = PEERS["flexgen-lp"](req)
    # Whole blocks, first in run order, at least the fraction's bytes: dit.0..3 (13 U ≥ 10.5), dec.0 (3 ≥ 2).
    streamed = {b.name for b in plan.streamed()}
    assert streamed == {"enc.0", "enc.1", "dit.0", "dit.1", "dit.2", "dit.3", "dec.0"}
    assert not does_not_fit(plan)
    assert plan.prediction.peak_total_bytes <= req.budget.vram_bytes


def test_flexgen_plan_that_cannot_fit_says_so():
    plan = PEERS["flexgen-lp"](request(8 * U))
    assert does_not_fit(plan)


@pytest.mark.parametrize("name", [n for n in PEERS if n != "all-resident"])
def test_no_peer_beats_all_resident_on_a_roomy_budget(name):
    req = request(64 * U, profile=cpu_profile(launch_us=2.0, overlap=0.7))
    baseline = PEERS["all-resident"](req)
    plan = PEERS[name](req)
    if does_not_fit(plan):
        pytest.skip(f"{name} does not fit")
    assert plan.prediction.frame_ms >= baseline.prediction.frame_ms * (1 - 1e-9)


# ---- execution modes as each peer's documentation gives them (module docstrings: "Execution mode")
MODE_FIGURES = {"graph_replay_us_per_kernel": 1.0, "compiled_dispatch_fraction": 0.5, "compile_s_per_block_class": 20.0,
                "graph_pool_bytes_per_class": 2**20}


def launch_bound_gpu():
    """A GPU whose calls are launch-bound (10 µs per eager launch, device work ~0) with the mode figures: graphed
    (1 µs per kernel) beats compiled (half the launches) beats eager."""
    prov = {k: Provenance("datasheet", "test", "test") for k in EXEC_MODE_FIELDS}
    p = flat_profile(link_gbps=LINK_GBPS, tflops=1e6, launch_us=10.0)
    return replace(p, **MODE_FIGURES, provenance={**p.provenance, **prov})


def modes(plan) -> dict[str, str]:
    return {b.name: b.exec_mode for b in plan.blocks}


COMFY_BUDGET = int(0.8 * GIB) + 12.5 * U  # dit.3, dit.5, dit.0 resident (test above), the rest cast per use


def test_comfyui_graphs_only_its_fully_resident_blocks_when_graphs_are_allowed():
    plan = PEERS["comfyui-partial"](request(COMFY_BUDGET, profile=launch_bound_gpu(), exec_mode="auto+graphed"))
    resident = resident_set(plan)
    assert resident == {"dit.3", "dit.5", "dit.0"}
    # cast per use is a graph break (cast_bias_weight is torch.compiler.disable'd): those blocks stay eager
    assert modes(plan) == {n: "graphed" if n in resident else "eager" for n in modes(plan)}
    assert not does_not_fit(plan)
    assert any("backend cudagraphs" in n for n in plan.notes)


def test_comfyui_compiles_its_resident_blocks_where_the_runtime_runs_no_graphs():
    gpu = launch_bound_gpu()
    auto = PEERS["comfyui-partial"](request(COMFY_BUDGET, profile=gpu, exec_mode="auto"))
    assert modes(auto) == {n: "compiled" if n in resident_set(auto) else "eager" for n in modes(auto)}
    assert any("backend inductor" in n for n in auto.notes)
    eager = PEERS["comfyui-partial"](request(COMFY_BUDGET, profile=gpu))  # the request's default: eager
    assert set(modes(eager).values()) == {"eager"}
    assert placements(eager) == placements(auto)  # the mode never moves a block
    assert auto.prediction.frame_ms < eager.prediction.frame_ms
    # a CPU profile has no graphs: "auto+graphed" falls back to the inductor backend
    cpu = PEERS["comfyui-partial"](request(COMFY_BUDGET, exec_mode="auto+graphed"))
    assert "graphed" not in set(modes(cpu).values())


def test_comfyui_keeps_the_faster_backend_that_fits():
    # graphs replaying at the eager launch cost buy nothing, and compiling halves the launches: inductor wins
    gpu = replace(launch_bound_gpu(), graph_replay_us_per_kernel=10.0)
    plan = PEERS["comfyui-partial"](request(COMFY_BUDGET, profile=gpu, exec_mode="auto+graphed"))
    assert set(modes(plan).values()) == {"compiled", "eager"}


def test_group_offload_runs_compiled_blocks_never_graphed():
    gpu = launch_bound_gpu()
    for exec_mode, expected in (("eager", "eager"), ("auto", "compiled"), ("compiled", "compiled"),
                                ("auto+graphed", "compiled"), ("graphed", "compiled")):
        plan = PEERS["diffusers-group-offload"](request(64 * U, profile=gpu, exec_mode=exec_mode))
        assert set(modes(plan).values()) == {expected}, exec_mode
        assert set(placements(plan).values()) == {"streamed"}
    compiled = PEERS["diffusers-group-offload"](request(64 * U, profile=gpu, exec_mode="auto"))
    assert any("graph break at every group" in n for n in compiled.notes)


def test_group_offload_pays_its_host_sync_per_group_compiled_or_not():
    gpu = launch_bound_gpu()
    req = request(64 * U, profile=gpu, exec_mode="auto")
    plan = PEERS["diffusers-group-offload"](req)
    # the hook runs outside the compiled graph: its sync stays at the eager launch cost, not the compiled fraction
    assert plan.execution.host_sync_per_onload_us == pytest.approx(10 * gpu.launch_overhead_us)
    without = predict(req.workload, replace(plan, execution=replace(plan.execution, host_sync_per_onload_us=0.0)),
                      gpu)
    calls = sum(req.workload.calls_per_frame(b.name) for b in req.workload.blocks)
    # the same placements and modes without the sync: faster by about one sync per streamed call
    assert plan.prediction.frame_ms > without.prediction.frame_ms
    assert plan.prediction.frame_ms - without.prediction.frame_ms == pytest.approx(
        calls * plan.execution.host_sync_per_onload_us * 1e-3, rel=0.05)
    # compiling still pays on a launch-bound device (PR 11605 measured it faster with offloading too)
    eager = PEERS["diffusers-group-offload"](request(64 * U, profile=gpu))
    assert plan.prediction.frame_ms < eager.prediction.frame_ms


@pytest.mark.parametrize("name", ["all-resident", "accelerate-sequential", "diffusers-model-offload", "forge",
                                  "flexgen-lp"])
def test_the_other_peers_stay_eager_under_every_request(name):
    for exec_mode in ("eager", "auto", "compiled", "auto+graphed", "graphed"):
        plan = PEERS[name](request(64 * U, profile=launch_bound_gpu(), exec_mode=exec_mode))
        assert set(modes(plan).values()) == {"eager"}, exec_mode


def test_allowed_modes_follow_the_request_and_the_backend():
    gpu, cpu = launch_bound_gpu(), cpu_profile()
    assert allowed_modes(request(U, profile=gpu)) == ("eager",)
    assert allowed_modes(request(U, profile=gpu, exec_mode="auto")) == ("eager", "compiled")
    assert allowed_modes(request(U, profile=gpu, exec_mode="auto+graphed")) == ("eager", "compiled", "graphed")
    assert allowed_modes(request(U, profile=cpu, exec_mode="graphed")) == ("eager", "compiled")
    with pytest.raises(ResidencyError, match="exec mode 'fast'"):
        PEERS["comfyui-partial"](request(COMFY_BUDGET, exec_mode="fast"))


@pytest.mark.parametrize("name", list(PEERS))
def test_each_peer_states_its_execution_mode_with_a_source(name):
    module = sys.modules[PEERS[name].__module__]
    doc = module.__doc__
    assert "Execution mode" in doc and "Sources:" in doc
    assert "https://" in doc.split("Sources:", 1)[1]
