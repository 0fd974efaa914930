"""The CUDA/ROCm backend on a real GPU: loads land intact and after the compute issued before them, plans
compute what the plain pipeline computes, and telemetry's CUDA events resolve. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.world_model import WorldModelPipeline
from pipelines.world_model.workload import catalog_entry
from residency.plan import BlockPlan, Budget, Execution, Plan
from residency.runtime import Runtime
from residency.workload import workload_from_dict

pytestmark = pytest.mark.gpu

ACTIONS = ("up", "left", "idle")
# Frames are uint8. Reordered bf16 arithmetic (another kernel for another pointer alignment) moves them by
# well under 1 level on average (measured on the CPU: every weight of one block nudged by 1-2 ulp gave 0.6-0.8);
# other weights, a stale slot or a copy that landed late give tens (64 for another seed's weights).
MEAN_LEVELS_TOLERANCE = 3.0


def _sleep_cycles(seconds: float) -> int:
    return int(seconds * 2e9)  # GPU clocks run at 1-2 GHz: at least `seconds` of spinning


@pytest.fixture(scope="module")
def workload():
    return workload_from_dict(catalog_entry("tiny"))


@pytest.fixture(scope="module")
def pipe():
    """One pipeline for the module: re-attaching it reuses its packed host store (K-quant packing takes seconds)."""
    return WorldModelPipeline.from_config("tiny", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def bf16_plan(w, placement: str, fmt: str = "BF16", dequant_on: str = "compute", depth: int = 1) -> Plan:
    blocks = tuple(BlockPlan(b.name, placement, fmt, "bf16", dequant_on=dequant_on) for b in w.blocks)
    return Plan(model=w.name, workload_fingerprint=w.fingerprint(), profile="test", profile_fingerprint="test",
                policy="test", budget=Budget(2**31), blocks=blocks, execution=Execution(prefetch_depth=depth),
                steps=w.steps, context_frames=w.context_frames)


def run_on_gpu(pipe, w, image, plan: Plan):
    rt = Runtime(plan, "cuda", workload=w).attach(pipe)
    try:
        s = pipe.start(image, seed=3)
        frames = [rt.step(s, a) for a in ACTIONS]
        snapshot = rt.telemetry()
        assert rt.ledger.peak_total_bytes <= rt.ledger.budget_bytes
    finally:
        rt.detach()
    assert next(pipe.parameters()).device.type == "cpu"  # detach put the weights back
    return frames, snapshot


def mean_levels_apart(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x.astype(np.int16) - y.astype(np.int16)).mean()) for x, y in zip(a, b, strict=True))


def test_the_backend_is_named_rocm_exactly_when_torch_is_a_hip_build():
    from residency.runtime.backend_cuda import CudaBackend

    assert CudaBackend().name == ("rocm" if torch.version.hip else "cuda")


def test_a_load_larger_than_the_pinned_ring_lands_intact():
    from residency.runtime.backend_cuda import STAGING_BUFFERS, STAGING_BYTES, CudaBackend

    backend = CudaBackend()
    backend.start()
    try:
        n = STAGING_BUFFERS * STAGING_BYTES + STAGING_BYTES // 2 + 123  # reuses every pinned buffer, ends mid-chunk
        blob = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        dst = backend.alloc(n)
        backend.wait(backend.submit(backend.make_recipe("blob", blob, dst, [], 0)))
        assert torch.equal(dst.cpu(), blob)
    finally:
        backend.stop()


def test_a_load_into_a_buffer_waits_for_the_compute_issued_before_it():
    from residency.runtime.backend_cuda import CudaBackend

    backend = CudaBackend()
    backend.start()
    try:
        n = 16 * 2**20
        slot = backend.alloc(n)
        backend.run_now(backend.make_recipe("ones", torch.ones(n, dtype=torch.uint8), slot, [], 0))
        torch.cuda._sleep(_sleep_cycles(0.1))  # the compute stream is busy when the read below is queued
        seen = slot.sum(dtype=torch.int64)
        ticket = backend.submit(backend.make_recipe("twos", torch.full((n,), 2, dtype=torch.uint8), slot, [], 0))
        backend.wait(ticket)
        assert int(seen) == n  # the read queued before the load saw the old bytes
        assert int(slot.sum(dtype=torch.int64)) == 2 * n  # and the load landed before what came after it
    finally:
        backend.stop()


def test_the_resident_plan_computes_what_the_plain_pipeline_computes_on_the_gpu(pipe, workload, image):
    plain = WorldModelPipeline.from_config("tiny", device="cuda", dtype=torch.bfloat16)
    s = plain.start(image, seed=3)
    expected = [s.step(a) for a in ACTIONS]
    got, _ = run_on_gpu(pipe, workload, image, bf16_plan(workload, "resident"))
    assert mean_levels_apart(got, expected) < MEAN_LEVELS_TOLERANCE


def test_a_streamed_plan_computes_what_the_resident_plan_computes(pipe, workload, image):
    resident, _ = run_on_gpu(pipe, workload, image, bf16_plan(workload, "resident"))
    streamed, _ = run_on_gpu(pipe, workload, image, bf16_plan(workload, "streamed", depth=2))
    assert mean_levels_apart(streamed, resident) < MEAN_LEVELS_TOLERANCE


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K"])
def test_dequant_on_the_copy_stream_matches_dequant_on_the_compute_stream(pipe, workload, image, fmt):
    on_compute, _ = run_on_gpu(pipe, workload, image, bf16_plan(workload, "streamed", fmt, "compute"))
    on_copy, _ = run_on_gpu(pipe, workload, image, bf16_plan(workload, "streamed", fmt, "copy"))
    assert mean_levels_apart(on_copy, on_compute) < MEAN_LEVELS_TOLERANCE


def test_a_resident_quantized_plan_matches_the_same_format_streamed(pipe, workload, image):
    streamed, _ = run_on_gpu(pipe, workload, image, bf16_plan(workload, "streamed", "Q4_K"))
    resident_q, _ = run_on_gpu(pipe, workload, image, bf16_plan(workload, "resident-quantized", "Q4_K"))
    assert mean_levels_apart(resident_q, streamed) < MEAN_LEVELS_TOLERANCE


def test_telemetry_of_a_streamed_plan_resolves_its_cuda_events(pipe, workload, image):
    _, snapshot = run_on_gpu(pipe, workload, image, bf16_plan(workload, "streamed"))
    latent = [f for f in snapshot.frames if f.frame >= 1]
    assert len(latent) >= len(ACTIONS) - 1  # the last frame is still open when the snapshot is taken
    for f in latent:
        assert f.frame_ms > 0 and f.compute_ms > 0
        assert f.copy_ms > 0 and f.link_bytes > 0  # every block streamed: each frame moves its weights
        assert f.stall_ms >= 0
        assert f.copy_ms < 10 * f.frame_ms  # seconds from one clock: no mark read from a recycled event
