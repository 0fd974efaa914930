"""The cost model on hand-checkable workloads: resident sums, hidden copies, interference, memory, bounds."""

import pytest
import torch
from sim_helpers import chain_workload, flat_profile, make_plan

from residency.formats.staging import staging_bytes
from residency.plan import Execution
from residency.simulate import lower_bound_s, simulate
from residency.simulate.costs import copy_bytes, copy_s
from residency.workload.spec import BlockSpec

DIM, TOKENS = 1024, 256
COMPUTE_MS = 2.0 * DIM * DIM * TOKENS / 1e12 * 1e3  # one block at 1 TFLOP/s
COPY_MS = DIM * DIM * 2 / 10e9 * 1e3  # one BF16 block at 10 GB/s


def test_all_resident_frame_is_the_sum_of_compute_times():
    profile, work = flat_profile(), chain_workload(n=4)
    pred = simulate(work, make_plan(work, profile), profile).prediction
    assert pred.frame_ms == pytest.approx(4 * COMPUTE_MS)
    assert pred.stall_ms == pytest.approx(0.0, abs=1e-9)
    assert pred.link_bytes_per_frame == 0


def test_dispatch_cost_adds_per_op_on_the_cpu_backend():
    profile, work = flat_profile(launch_us=10.0, backend="cpu"), chain_workload(n=4)
    pred = simulate(work, make_plan(work, profile), profile).prediction
    ops = 2 * (2 * 1 + 10)  # estimate without a count: two per matrix plus the block's glue, views twice that
    assert pred.frame_ms == pytest.approx(4 * (COMPUTE_MS + ops * 10e-3))


def test_counted_ops_replace_the_estimate():
    from dataclasses import replace

    from residency.workload import Workload

    profile, base = flat_profile(launch_us=10.0, backend="cpu"), chain_workload(n=4)
    work = Workload(base.name, tuple(replace(b, ops_per_call=100, kernels_per_call=40) for b in base.blocks),
                    base.phases, base.steps, base.context_frames)
    pred = simulate(work, make_plan(work, profile), profile).prediction
    assert pred.frame_ms == pytest.approx(4 * (COMPUTE_MS + 100 * 10e-3))
    gpu = flat_profile(launch_us=100.0)  # 40 kernels × 100 µs = 4 ms > 0.54 ms of work
    assert simulate(work, make_plan(work, gpu), gpu).prediction.frame_ms == pytest.approx(4 * 40 * 0.1)


def test_gpu_launch_overhead_hides_under_device_work_unless_longer():
    work = chain_workload(n=4)
    hidden = flat_profile(launch_us=10.0)
    assert simulate(work, make_plan(work, hidden), hidden).prediction.frame_ms == pytest.approx(4 * COMPUTE_MS)
    exposed = flat_profile(launch_us=100.0)  # 12 kernels × 100 µs > 0.54 ms of work
    assert simulate(work, make_plan(work, exposed), exposed).prediction.frame_ms == pytest.approx(4 * 12 * 0.1)


def test_streamed_block_with_a_slot_ahead_hides_its_copy_under_compute():
    profile, work = flat_profile(overlap=1.0), chain_workload(n=4)
    pred = simulate(work, make_plan(work, profile, {"dit.blocks.2": "streamed"}, depth=1), profile).prediction
    assert COPY_MS < COMPUTE_MS
    assert pred.frame_ms == pytest.approx(4 * COMPUTE_MS)
    assert pred.stall_ms == pytest.approx(0.0, abs=1e-6)
    assert pred.link_bytes_per_frame == DIM * DIM * 2


def test_with_zero_overlap_a_copy_beside_compute_costs_its_full_time():
    profile, work = flat_profile(overlap=0.0), chain_workload(n=4)
    pred = simulate(work, make_plan(work, profile, {"dit.blocks.2": "streamed"}, depth=1), profile).prediction
    assert pred.frame_ms == pytest.approx(4 * COMPUTE_MS + COPY_MS)


def test_partial_overlap_lands_between():
    work = chain_workload(n=4)
    times = []
    for overlap in (0.0, 0.5, 1.0):
        profile = flat_profile(overlap=overlap)
        plan = make_plan(work, profile, {"dit.blocks.2": "streamed"}, depth=1)
        times.append(simulate(work, plan, profile).prediction.frame_ms)
    assert times[0] > times[1] > times[2]
    assert times[1] == pytest.approx(4 * COMPUTE_MS + 0.5 * COPY_MS)


def test_without_prefetch_a_streamed_block_stalls_for_its_copy():
    profile, work = flat_profile(), chain_workload(n=4)
    plan = make_plan(work, profile, {"dit.blocks.2": "streamed"}, depth=0, copy_mode="sync")
    pred = simulate(work, plan, profile).prediction
    assert pred.frame_ms == pytest.approx(4 * COMPUTE_MS + COPY_MS)


def test_copy_bound_stream_runs_at_link_speed():
    # Slow link: every block streamed, copies (4 × 10·COPY) dominate compute.
    profile, work = flat_profile(link_gbps=1.0), chain_workload(n=4)
    plan = make_plan(work, profile, {f"dit.blocks.{i}": "streamed" for i in range(4)}, depth=2)
    pred = simulate(work, plan, profile).prediction
    assert pred.frame_ms == pytest.approx(4 * 10 * COPY_MS, rel=1e-6)
    assert pred.stall_ms == pytest.approx(4 * 10 * COPY_MS - 4 * COMPUTE_MS, rel=1e-6)


def test_quantized_streaming_moves_fewer_bytes_and_pays_dequant():
    profile, work = flat_profile(link_gbps=1.0, dequant_gw=100.0), chain_workload(n=4)
    streamed = {f"dit.blocks.{i}": "streamed" for i in range(4)}
    bf16 = simulate(work, make_plan(work, profile, streamed, depth=2), profile).prediction
    q4 = simulate(work, make_plan(work, profile, streamed, fmt="Q4_K", depth=2), profile).prediction
    assert q4.link_bytes_per_frame == 4 * DIM * DIM * 144 // 256
    assert q4.frame_ms < bf16.frame_ms
    assert q4.quality_loss > bf16.quality_loss


def test_memory_peaks_by_kind_add_up():
    profile, work = flat_profile(), chain_workload(n=4)
    plan = make_plan(work, profile, {"dit.blocks.3": "streamed", "dit.blocks.2": "resident-quantized"},
                     fmt="Q8_0", depth=2)
    pred = simulate(work, plan, profile).prediction
    q8 = DIM * DIM // 32 * 34
    assert pred.peak_bytes["resident"] == 2 * DIM * DIM * 2  # dequantized at load, bf16
    assert pred.peak_bytes["resident_quantized"] == q8
    assert pred.peak_bytes["slots"] == 3 * q8
    # one bf16 scratch for per-call dequant, (GPU) a staging buffer for a Q8_0 blob unpacked on load, and the
    # dequant staging of each thread that unpacks (compute and copy side)
    staging = staging_bytes("cuda", DIM * DIM, torch.bfloat16)
    assert pred.peak_bytes["dequant_scratch"] == DIM * DIM * 2 + q8 + 2 * staging
    assert pred.peak_total_bytes == sum(v for k, v in pred.peak_bytes.items() if k != "reserve")


def test_lower_bound_is_never_above_the_simulated_frame():
    work = chain_workload(n=6)
    for link in (1.0, 10.0, 100.0):
        profile = flat_profile(link_gbps=link)
        for k in range(7):
            plan = make_plan(work, profile, {f"dit.blocks.{i}": "streamed" for i in range(k)}, depth=2,
                             vram=(6 - k + 2) * DIM * DIM * 2 + 128 * 2**20)
            sim = simulate(work, plan, profile)
            assert lower_bound_s(work, plan, profile) * 1e3 <= sim.prediction.frame_ms * (1 + 1e-9)


def test_timeline_has_copy_and_compute_tracks_in_order():
    profile, work = flat_profile(dequant_gw=1.0), chain_workload(n=3)
    plan = make_plan(work, profile, {"dit.blocks.1": "streamed"}, fmt="Q4_K")
    sim = simulate(work, plan, profile)
    tracks = {e.track for e in sim.events}
    assert tracks == {"copy", "dequant", "compute"}
    computes = [e for e in sim.events if e.track == "compute"]
    assert all(a.end_ms <= b.start_ms + 1e-9 for a, b in zip(computes, computes[1:], strict=False))
    for e in sim.events:
        if e.track == "compute" and e.label == "dit.blocks.1":
            copy = next(c for c in sim.events if c.track == "copy" and c.label == e.label and c.frame == e.frame)
            assert copy.end_ms <= e.start_ms + 1e-9


def test_plan_for_another_workload_is_refused():
    from residency.errors import ResidencyError

    profile = flat_profile()
    plan = make_plan(chain_workload(n=4), profile)
    with pytest.raises(ResidencyError, match="fingerprint"):
        simulate(chain_workload(n=5), plan, profile)


def test_plan_round_trips_through_json(tmp_path):
    from residency.plan import load_plan, save_plan
    from residency.simulate import predict

    profile, work = flat_profile(), chain_workload(n=3)
    plan = predict(work, make_plan(work, profile, {"dit.blocks.1": "streamed"}, fmt="Q4_K", depth=2), profile)
    path = save_plan(plan, tmp_path / "plan.json")
    again = load_plan(path)
    assert again == plan
    assert list(tmp_path.iterdir()) == [path]


def test_a_broken_plan_file_names_the_field(tmp_path):
    import json

    from residency.errors import ResidencyError
    from residency.plan import load_plan, plan_to_dict

    profile, work = flat_profile(), chain_workload(n=2)
    doc = plan_to_dict(make_plan(work, profile))
    doc["blocks"][1]["placement"] = "on-the-moon"
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ResidencyError, match=r"plan.json: field 'blocks\[1\]\.placement' = 'on-the-moon'"):
        load_plan(path)


def test_token_independent_flops_run_at_the_one_row_rate():
    from dataclasses import replace

    from residency.device.profile import Curve

    base = flat_profile()
    # 1 TFLOP/s at 1 row, 4 TFLOP/s from 16 rows on: the adaLN projection pays the slow end
    profile = replace(base, matmul_tflops={d: Curve((1.0, 16.0), (1.0, 4.0)) for d in base.matmul_tflops})
    work = chain_workload(n=1)
    fixed_flops = 2.0 * DIM * 6 * DIM
    block = replace(work.blocks[0], fixed_flops=fixed_flops)
    work = replace(work, blocks=(block,))
    pred = simulate(work, make_plan(work, profile), profile).prediction
    assert pred.frame_ms == pytest.approx(COMPUTE_MS / 4 + fixed_flops / 1e12 * 1e3)


def test_small_matrices_run_at_the_small_weight_rate():
    from dataclasses import replace

    from residency.device.profile import Curve

    # 4 TFLOP/s against 1024² weights, 1 TFLOP/s against 256²: a block of 256² matrices pays the slow rate,
    # one of 512² lands between on log size, one of 1024² (or larger) the fast one.
    profile = replace(flat_profile(tflops=4.0), matmul_weight_dim=1024, matmul_small_weight_dim=256,
                      matmul_small_tflops={"bf16": Curve((1.0, 1e6), (1.0, 1.0))})

    def frame_ms(dim):
        work = chain_workload(n=1, dim=dim)
        return simulate(work, make_plan(work, profile), profile).prediction.frame_ms

    def at(dim, tflops):
        return 2.0 * dim * dim * TOKENS / (tflops * 1e12) * 1e3

    assert frame_ms(256) == pytest.approx(at(256, 1.0))
    assert frame_ms(512) == pytest.approx(at(512, 2.5))  # halfway between 256² and 1024² on log size
    assert frame_ms(1024) == pytest.approx(at(1024, 4.0))
    assert frame_ms(2048) == pytest.approx(at(2048, 4.0))
    # without a small-weight curve every size runs at the one rate
    plain = flat_profile(tflops=4.0)
    work = chain_workload(n=1, dim=256)
    assert simulate(work, make_plan(work, plain), plain).prediction.frame_ms == pytest.approx(at(256, 4.0))


def test_activation_elements_add_at_the_elementwise_rate_or_the_memory_bandwidth():
    from dataclasses import replace

    from residency.device.profile import Curve

    base = chain_workload(n=2)
    work = replace(base, blocks=tuple(replace(b, activation_elements_per_call=5_000_000) for b in base.blocks))
    measured = flat_profile(memory_gbps=100.0)  # a GPU: its curve is in bf16, the plan's compute dtype
    # 4 G elements/s for tensors up to 4096 elements, 1 G/s from 65536 on (log-interpolated between)
    measured = replace(measured, elementwise_gelems_per_s=Curve((4096.0, 65536.0), (4.0, 1.0)))
    pred = simulate(work, make_plan(work, measured), measured).prediction
    assert pred.frame_ms == pytest.approx(2 * (COMPUTE_MS + 5e6 / 4e9 * 1e3))  # not counted by size: the first class
    by_size = replace(base, blocks=tuple(replace(b, activation_elements_per_call=5_000_000,
                                                 activation_elements_by_size=((4096, 1_000_000), (65536, 4_000_000)))
                                         for b in base.blocks))
    pred = simulate(by_size, make_plan(by_size, measured), measured).prediction
    assert pred.frame_ms == pytest.approx(2 * (COMPUTE_MS + (1e6 / 4e9 + 4e6 / 1e9) * 1e3))
    gpu = flat_profile(memory_gbps=100.0)  # no measured rate: 2-byte elements at 100 GB/s, 0.1 ms a call
    pred = simulate(work, make_plan(work, gpu), gpu).prediction
    assert pred.frame_ms == pytest.approx(2 * (COMPUTE_MS + 0.1))


def test_elementwise_rate_scales_with_batch_and_element_width():
    from dataclasses import replace

    from residency.device.profile import Curve

    curve = Curve((4096.0, 65536.0), (4.0, 1.0))
    gpu = replace(flat_profile(), elementwise_gelems_per_s=curve)  # a GPU curve is measured in bf16
    cpu = replace(flat_profile(backend="cpu"), elementwise_gelems_per_s=curve)  # a CPU curve in fp32
    assert gpu.elementwise_s(4e9, 2, 4096) == pytest.approx(1.0)
    assert gpu.elementwise_s(4e9, 4, 4096) > 2.0  # fp32 moves twice the bytes, into a slower (larger) class
    assert cpu.elementwise_s(4e9, 4, 4096) == pytest.approx(1.0)
    base = chain_workload(n=1)
    block = replace(base.blocks[0], activation_elements_per_call=4096, activation_elements_by_size=((4096, 4096),))
    one = simulate(replace(base, blocks=(block,)), make_plan(replace(base, blocks=(block,)), gpu), gpu)
    batched_work = replace(base, blocks=(block,), batch=16)
    batched = simulate(batched_work, make_plan(batched_work, gpu), gpu)  # bf16 plans on the bf16 curve
    # 16× the elements, each tensor 16× larger: the 65536-element class's rate, 4× slower per element
    elementwise_one = 4096 / 4e9 * 1e3
    assert batched.prediction.frame_ms - 16 * COMPUTE_MS == pytest.approx(16 * 4 * elementwise_one)
    assert one.prediction.frame_ms - COMPUTE_MS == pytest.approx(elementwise_one)


def test_a_cpu_load_that_unpacks_copies_only_the_tensors_it_does_not_convert():
    block = BlockSpec(name="dit.blocks.0", component="dit", tokens=16, flops_per_token=1.0,
                      tensors=(("w1", (256, 256)), ("w2", (512, 256)), ("norm", (256,))), own_dtypes=(("norm", "fp32"),))
    cpu, gpu = flat_profile(backend="cpu"), flat_profile(backend="cuda")
    kept = 256 * 4  # the fp32 norm is computed as stored: the only tensor such a load copies
    assert copy_bytes(block, "Q8_0", "fp32", cpu, unpacks=True) == kept
    assert copy_bytes(block, "Q8_0", "fp32", cpu, unpacks=False) == block.nbytes("Q8_0")  # packed slot: whole blob
    assert copy_bytes(block, "Q8_0", "bf16", gpu, unpacks=True) == block.nbytes("Q8_0")  # a GPU copies, then unpacks
    assert copy_bytes(block, "F32", "fp32", cpu, unpacks=True) == block.nbytes("F32")  # nothing to convert
    execution = Execution(per_tensor_copies=True)
    assert copy_s(block, "Q8_0", cpu, execution, "fp32", unpacks=True) == pytest.approx(cpu.h2d_s(kept))


def test_a_sync_load_is_the_copy_engines_time_and_a_stall_as_the_runtime_records_it():
    # the plan table showed "copy 0.00" for sync-streamed blocks and folded their loads into compute, while the
    # runtime records a blocking load as copy-engine time and a stall: the dashboard compared 19 ms of copies
    # with 0 predicted, and a compute stream 0.62x its prediction
    w, prof = chain_workload(n=3, dim=1024, tokens=16), flat_profile(link_gbps=1.0, overlap=0.0)
    streamed = {b.name: "streamed" for b in w.blocks}
    sync = simulate(w, make_plan(w, prof, streamed, fmt="BF16", copy_mode="sync"), prof, bound=False)
    resident = simulate(w, make_plan(w, prof, fmt="BF16"), prof, bound=False).prediction
    p = sync.prediction
    load_ms = 3 * (1024 * 1024 * 2) / 1e9 * 1e3  # three 2 MiB blobs over 1 GB/s, each once per frame
    assert p.copy_ms == pytest.approx(load_ms, rel=1e-6) and p.stall_ms == pytest.approx(load_ms, rel=1e-6)
    assert p.compute_ms == pytest.approx(resident.compute_ms, rel=1e-6)
    assert p.frame_ms == pytest.approx(p.compute_ms + p.copy_ms, rel=1e-6)  # one stream: nothing overlaps
    tracks = {(e.label, e.track) for e in sync.events if e.frame == sync.steady_frame}
    assert all((b.name, "copy") in tracks and (b.name, "compute") in tracks for b in w.blocks)
