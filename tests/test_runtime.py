"""The runtime on the CPU backend: outputs equal the plain pipeline, memory is accounted, detach restores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sim_helpers import flat_profile

from pipelines.world_model import WorldModelPipeline
from pipelines.world_model.workload import catalog_entry
from residency.errors import ResidencyError
from residency.formats import get_format
from residency.formats.sizing import effective_format
from residency.plan import BlockPlan, Budget, Execution, Plan
from residency.runtime import DeviceBudgetExceeded, HostMemoryExceeded, Runtime, clear_host_cache
from residency.runtime.host_store import block_tensor
from residency.simulate import simulate
from residency.workload import workload_from_dict

ACTIONS = ["up", "left", "idle", "jump"]


@pytest.fixture(scope="module")
def workload():
    return workload_from_dict(catalog_entry("tiny"))


# The runtime computes at cores-1 threads; references must use the same count to be bitwise equal.
pytestmark = pytest.mark.usefixtures("one_compute_thread")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def tiny_plan(w, placement="resident", fmt="F32", depth=1, vram=2**31, overrides=None, lifetime="session",
              dequant_on="compute", profile=None, **execution) -> Plan:
    """A hand-made plan; `profile` gives it that profile's fingerprint (what a re-plan is checked against)."""
    overrides = overrides or {}
    blocks = tuple(BlockPlan(b.name, overrides.get(b.name, placement), fmt, "fp32", lifetime, dequant_on)
                   for b in w.blocks)
    return Plan(model=w.name, workload_fingerprint=w.fingerprint(), profile="test",
                profile_fingerprint=profile.fingerprint() if profile else "test",
                policy="test", budget=Budget(vram), blocks=blocks,
                execution=Execution(prefetch_depth=depth, **execution), steps=w.steps,
                context_frames=w.context_frames)


def run_plain(pipe, image, actions=ACTIONS, seed=3):
    s = pipe.start(image, seed=seed)
    return [s.step(a) for a in actions]


def run_attached(pipe, image, workload, plan, actions=ACTIONS, seed=3):
    rt = Runtime(plan, "cpu", workload=workload).attach(pipe)
    try:
        s = pipe.start(image, seed=seed)
        out = [rt.step(s, a) for a in actions]
        assert rt.ledger.peak_total_bytes <= rt.ledger.budget_bytes
        return out, rt
    finally:
        rt.detach()


@pytest.mark.parametrize("placement,depth", [("resident", 1), ("streamed", 0), ("streamed", 1), ("streamed", 3),
                                             ("resident-quantized", 1)])
def test_same_precision_plan_is_bitwise_equal_to_the_plain_pipeline(workload, image, placement, depth):
    pipe = WorldModelPipeline.from_config("tiny")
    expected = run_plain(pipe, image)
    got, _ = run_attached(pipe, image, workload, tiny_plan(workload, placement, depth=depth))
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)


def test_mixed_plan_with_phase_lifetimes_and_sync_copies_is_bitwise_equal(workload, image):
    pipe = WorldModelPipeline.from_config("tiny")
    expected = run_plain(pipe, image)
    names = [b.name for b in workload.blocks]
    overrides = {n: "streamed" for n in names if n.startswith("dit.blocks")}
    overrides.update({n: "resident-quantized" for n in names if n.startswith("vae.decoder")})
    for plan in (tiny_plan(workload, "resident", overrides=overrides, lifetime="phase"),
                 tiny_plan(workload, "streamed", copy_mode="sync")):
        got, _ = run_attached(pipe, image, workload, plan)
        for a, b in zip(got, expected, strict=True):
            assert np.array_equal(a, b)


def _roundtrip_weights(pipe, workload, fmt_name):
    """The values a format really stores, written into a plain pipeline's weights."""
    fmt = get_format(fmt_name)
    modules = {n: m for n, m, _ in pipe.blocks()}
    with torch.no_grad():
        for b in workload.blocks:
            for name, shape in b.tensors:
                t = block_tensor(modules[b.name], name)
                t.copy_(effective_format(fmt, shape).roundtrip(t).view(shape))


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K"])
@pytest.mark.parametrize("placement,dequant_on", [("streamed", "compute"), ("streamed", "copy"),
                                                  ("resident", "compute"), ("resident-quantized", "compute")])
def test_quantized_plan_computes_exactly_the_formats_stored_weights(workload, image, fmt, placement, dequant_on):
    pipe = WorldModelPipeline.from_config("tiny")
    got, _ = run_attached(pipe, image, workload, tiny_plan(workload, placement, fmt, dequant_on=dequant_on))
    exact = run_plain(pipe, image)
    _roundtrip_weights(pipe, workload, fmt)  # after the attached run: the host store saw the originals
    expected = run_plain(pipe, image)
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)
    # and the format's error is visible, but small, against the full-precision pipeline
    diff = np.mean([np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(got, exact, strict=True)])
    assert 0 < diff < 8


def test_ledger_holds_what_the_simulator_predicts(workload):
    pipe = WorldModelPipeline.from_config("tiny")
    profile = flat_profile(backend="cpu")  # the runtime below is the CPU backend: no GPU staging or workspace
    # phase lifetimes: the arena aligns each block to a cache line; the prediction must count that padding
    odd = tiny_plan(workload, "resident", lifetime="phase")
    odd = Plan(**{**odd.__dict__, "blocks": tuple(
        BlockPlan(bp.name, "resident-quantized" if i % 3 == 1 else bp.placement, "Q4_K" if i % 3 == 1 else "F32",
                  "fp32", "phase", "compute") for i, bp in enumerate(odd.blocks))})
    for plan in (tiny_plan(workload, "resident"), tiny_plan(workload, "streamed", depth=2),
                 tiny_plan(workload, "resident-quantized", "F32"), odd):
        predicted = simulate(workload, plan, profile).prediction.peak_bytes
        rt = Runtime(plan, "cpu", workload=workload).attach(pipe)
        held = dict(rt.ledger.snapshot().current_bytes)
        rt.detach()
        for kind in ("resident", "resident_quantized", "slots", "dequant_scratch", "kv_cache", "activations"):
            assert held[kind] == predicted[kind], (kind, plan.blocks[0].lifetime)
        assert held["workspace"] == 0  # the CPU backend has no matmul workspace
        assert rt.ledger.total_bytes == 0  # everything released on detach


def test_every_live_sessions_kv_cache_is_held_and_a_dropped_one_is_let_go(workload, image):
    """Two sessions stepped under one runtime each hold a KV cache on the device: the ledger held only the last
    stepped one's. A session dropped stops counting at the next step; one over the budget is refused, held as
    it was."""
    import gc

    pipe = WorldModelPipeline.from_config("tiny")
    rt = Runtime(tiny_plan(workload, "resident"), "cpu", workload=workload).attach(pipe)
    try:
        kv = lambda: dict(rt.ledger.snapshot().current_bytes)["kv_cache"]  # noqa: E731
        a = pipe.start(image, seed=0)
        rt.step(a, ACTIONS[0])
        one = kv()
        assert one == a.kv_cache_bytes > 0
        b = pipe.start(image, seed=1)
        rt.step(b, ACTIONS[0])
        assert kv() == a.kv_cache_bytes + b.kv_cache_bytes
        del a
        gc.collect()
        rt.step(b, ACTIONS[1])
        assert kv() == b.kv_cache_bytes
        rt.ledger.budget_bytes = rt.ledger.total_bytes + b.kv_cache_bytes // 2  # room for half another cache
        c = pipe.start(image, seed=2)
        with pytest.raises(DeviceBudgetExceeded, match="the KV caches of 2 live sessions") as refused:
            rt.step(c, ACTIONS[0])
        assert "no longer step" in refused.value.hint
        assert kv() == b.kv_cache_bytes
    finally:
        rt.detach()


def test_a_plan_that_cannot_fit_is_refused_at_attach(workload):
    pipe = WorldModelPipeline.from_config("tiny")
    before = [p.data_ptr() for p in pipe.parameters()]
    rt = Runtime(tiny_plan(workload, "resident", vram=4 * 2**20), "cpu", workload=workload)
    with pytest.raises(DeviceBudgetExceeded, match="budget"):
        rt.attach(pipe)
    assert [p.data_ptr() for p in pipe.parameters()] == before
    assert rt.ledger.peak_total_bytes == 0 and torch.get_num_threads() == 1
    assert not any(m._forward_pre_hooks for m in pipe.modules())


def test_detach_restores_weights_devices_hooks_and_threads(workload, image):
    pipe = WorldModelPipeline.from_config("tiny")
    state = {k: v.clone() for k, v in pipe.state_dict().items()}
    ptrs = [p.data_ptr() for p in pipe.parameters()]
    rt = Runtime(tiny_plan(workload, "streamed", "Q8_0"), "cpu", workload=workload).attach(pipe)
    assert torch.get_num_threads() == rt.backend.compute_threads
    assert [p.data_ptr() for p in pipe.parameters()] != ptrs
    rt.step(pipe.start(image, seed=0), "up")
    rt.detach()
    assert [p.data_ptr() for p in pipe.parameters()] == ptrs
    for k, v in pipe.state_dict().items():
        assert torch.equal(v, state[k]) and v.device.type == "cpu", k
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in pipe.modules())
    assert not any(hasattr(m, "_residency_hook") or "forward" in m.__dict__ for m in pipe.modules())
    assert torch.get_num_threads() == 1


def test_a_recovery_reuses_the_host_store_and_detach_forgets_it(workload, image):
    clear_host_cache()
    pipe = WorldModelPipeline.from_config("tiny")
    plan = tiny_plan(workload, "streamed")
    rt = Runtime(plan, "cpu", workload=workload).attach(pipe)
    packed = rt.store.packed_now_bytes
    assert packed > 0
    rt._detach_blocks()  # what a recovery or a plan switch does before it attaches the next plan
    rt._attach(pipe, plan)
    assert rt.store.packed_now_bytes == 0 and rt.store.reused_bytes == packed
    rt.detach()
    assert rt.store.blobs == {}  # the host memory goes with the attach
    with torch.no_grad():  # an edit no version counter sees: in place, through .data
        pipe.dit.final.proj.weight.data.mul_(0.5)
    expected = run_plain(pipe, image)
    got, rt2 = run_attached(pipe, image, workload, plan)
    assert rt2.store.packed_now_bytes == packed  # packed again, from the weights as they are now
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)


def test_host_store_that_cannot_fit_is_a_clear_error(workload):
    clear_host_cache()
    pipe = WorldModelPipeline.from_config("tiny")
    rt = Runtime(tiny_plan(workload, "streamed"), "cpu", workload=workload, host_budget_bytes=2**20)
    with pytest.raises(HostMemoryExceeded, match="host store needs"):
        rt.attach(pipe)


def test_out_of_schedule_calls_load_synchronously_and_resynchronise(workload, image):
    pipe = WorldModelPipeline.from_config("tiny")
    plain = run_plain(pipe, image, ACTIONS[:2])
    latent = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected_decode = pipe.vae.decoder(latent)
    rt = Runtime(tiny_plan(workload, "streamed", depth=2), "cpu", workload=workload).attach(pipe)
    try:
        s = pipe.start(image, seed=3)
        first = rt.step(s, ACTIONS[0])
        with torch.inference_mode():
            decoded = pipe.vae.decoder(latent)  # the decoder, mid-stream: not what the schedule expects
        second = rt.step(s, ACTIONS[1])
        assert rt.executor_stats["resyncs"] + rt.executor_stats["out_of_schedule_calls"] > 0
    finally:
        rt.detach()
    assert torch.equal(decoded, expected_decode)
    assert np.array_equal(first, plain[0]) and np.array_equal(second, plain[1])


def test_phase_blocks_are_loaded_per_phase_run(workload, image):
    pipe = WorldModelPipeline.from_config("tiny")
    plan = tiny_plan(workload, "resident", lifetime="phase")
    rt = Runtime(plan, "cpu", workload=workload).attach(pipe)
    try:
        s = pipe.start(image, seed=3)
        for a in ACTIONS:
            rt.step(s, a)
        frames = rt.telemetry().frames
    finally:
        rt.detach()
    dit_bytes = sum(workload.by_name[b].nbytes("F32") for b in workload.phase("denoise").blocks)
    dec_bytes = sum(workload.by_name[b].nbytes("F32") for b in workload.phase("decode").blocks)
    # every latent frame reloads the denoise and the decode phase's blocks, and nothing else
    assert [f.link_bytes for f in frames if f.frame >= 1] == [dit_bytes + dec_bytes] * len(ACTIONS)  # every step, the last too: a frame closes as its step ends (CPU)
    assert math.isclose(frames[-1].device_peak_bytes, rt.ledger.peak_total_bytes)


def test_detach_refuses_to_drop_a_forward_wrapper_added_after_attach(workload):
    pipe = WorldModelPipeline.from_config("tiny")
    rt = Runtime(tiny_plan(workload, "resident"), "cpu", workload=workload).attach(pipe)
    block = next(m for name, m, _ in pipe.blocks() if name == "dit.blocks.0")
    ours = block.forward
    block.forward = lambda *a, **k: ours(*a, **k)  # another library wraps after us
    with pytest.raises(RuntimeError, match="wrapped again"):
        rt.detach()
    assert rt.pipeline is pipe  # nothing was undone: still attached, hooks in place
    block.forward = ours
    rt.detach()
    assert not any("forward" in m.__dict__ for m in pipe.modules())


def test_detach_after_the_user_deleted_every_forward_wrapper(workload):
    # `del module.forward` (the hint's way out) takes residency's wrapper with the user's: detach must then
    # finish, not refuse for good (the model stayed attached for the life of the process)
    pipe = WorldModelPipeline.from_config("tiny")
    rt = Runtime(tiny_plan(workload, "resident"), "cpu", workload=workload).attach(pipe)
    block = next(m for name, m, _ in pipe.blocks() if name == "dit.blocks.0")
    ours = block.forward
    block.forward = lambda *a, **k: ours(*a, **k)
    with pytest.raises(ResidencyError, match="wrapped again") as caught:
        rt.detach()
    assert caught.value.hint and "del module.forward" in caught.value.hint
    del block.forward
    rt.detach()
    assert rt.pipeline is None
    assert not any("forward" in m.__dict__ for m in pipe.modules())


def test_loads_already_in_the_compute_dtype_are_one_whole_copy_with_no_device_staging(workload, image):
    # A GPU backend stages every blob it unpacks on the device; a resident block already in the compute dtype
    # must not go that way (an all-resident BF16 plan sized no staging at all), and whatever does unpack must
    # be covered by the staging the memory sized.
    from residency.runtime.device_memory import lands_as_is

    pipe = WorldModelPipeline.from_config("tiny")
    phase = tiny_plan(workload, "resident", lifetime="phase")
    rt = Runtime(phase, "cpu", workload=workload).attach(pipe)
    try:
        memory, executor = rt._memory, rt._executor
        assert all(lands_as_is(memory.blobs[bp.name], "fp32") for bp in phase.blocks)
        recipes = [r for rs in executor.phase_recipes.values() for r in rs]
        assert recipes and all(r.copy_src is not None and not r.unpacks for r in recipes)
        assert memory.staging_bytes == 0
    finally:
        rt.detach()
    mixed = tiny_plan(workload, "resident", lifetime="phase",
                      overrides={b.name: "resident" for b in workload.blocks})
    mixed = Plan(**{**mixed.__dict__, "blocks": tuple(
        BlockPlan(bp.name, bp.placement, "Q8_0" if i % 2 else "F32", "fp32", "phase", "compute")
        for i, bp in enumerate(mixed.blocks))})
    rt = Runtime(mixed, "cpu", workload=workload).attach(pipe)
    try:
        memory = rt._memory
        unpacked = [bp for bp in mixed.blocks if not lands_as_is(memory.blobs[bp.name], "fp32")]
        assert unpacked and all(bp.format == "Q8_0" for bp in unpacked)
        recipes = {r.label: r for rs in rt._executor.phase_recipes.values() for r in rs}
        assert all(recipes[f"load {bp.name}"].unpacks for bp in unpacked)
        assert all(not recipes[f"load {bp.name}"].unpacks for bp in mixed.blocks if bp not in unpacked)
    finally:
        rt.detach()


def test_a_failed_attach_leaves_no_blob_cached(workload, image):
    from dataclasses import replace

    from residency.runtime import host_store

    clear_host_cache()
    pipe = WorldModelPipeline.from_config("tiny")
    tight = replace(tiny_plan(workload, "streamed"), budget=Budget(1000))
    with pytest.raises(DeviceBudgetExceeded):
        Runtime(tight, "cpu", workload=workload).attach(pipe)
    assert sum(len(v) for v in host_store._CACHE.values()) == 0
    with torch.no_grad():  # an edit no version counter sees: the next attach must pack it
        pipe.dit.final.proj.weight.data.mul_(0.5)
    expected = run_plain(pipe, image)
    got, _ = run_attached(pipe, image, workload, tiny_plan(workload, "streamed"))
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)


def test_a_second_live_session_over_the_budget_is_recovered_by_a_plan_that_leaves_it_room(workload, image):
    # every re-plan was made for the budget with one KV cache in it, and failed again on the second session's: four
    # recoveries, then the error, where a plan streaming a few more blocks held both
    from policies import PlanRequest, get_policy

    profile = flat_profile(backend="cpu")

    def replan(budget, prof):
        return get_policy("ours")(PlanRequest(workload, prof, budget, compute_dtype="fp32"))

    pipe = WorldModelPipeline.from_config("tiny")
    a, b = pipe.start(image, seed=0), pipe.start(image, seed=1)
    resident = replan(Budget(2**31, None), profile)
    budget = resident.prediction.peak_total_bytes + a.kv_cache_bytes // 2  # one cache and a half beside the weights
    rt = Runtime(replan(Budget(budget, None), profile), "cpu", workload=workload, replan=replan, profile=profile)
    with rt.attach(pipe):
        rt.step(a, ACTIONS[0])
        rt.step(b, ACTIONS[0])  # recovered: a plan for the budget less the other session's cache
        rt.step(a, ACTIONS[1])
        assert len(rt.recoveries) == 1
        assert rt.ledger.peak_total_bytes <= budget
        assert dict(rt.ledger.snapshot().current_bytes)["kv_cache"] == a.kv_cache_bytes + b.kv_cache_bytes


def test_step_of_something_not_a_session_is_a_clear_error(workload):
    pipe = WorldModelPipeline.from_config("tiny")
    with Runtime(tiny_plan(workload, "resident"), "cpu", workload=workload).attach(pipe) as rt:
        with pytest.raises(ResidencyError, match="step\\(\\) takes a session, got str") as e:
            rt.step("notasession", "right")  # an AttributeError from deep inside: 'str' … 'snapshot'
        assert "pipe.start" in e.value.hint
