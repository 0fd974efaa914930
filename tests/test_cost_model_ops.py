"""The cost model by op kind: attention at the profile's attention rate, conv2d kernels at its conv rate, the CPU's
cache re-warm after each weight, their profile fields (read, written, older profiles without them) and their CPU
measurements."""

from __future__ import annotations

import copy
import dataclasses

import pytest
from sim_helpers import flat_profile

from residency.device import measure_cpu
from residency.device.profile import Curve
from residency.device.profile_io import profile_from_dict, profile_to_dict
from residency.errors import ResidencyError
from residency.plan import BlockPlan
from residency.simulate import costs
from residency.workload import BlockSpec

MM_TFLOPS = 0.1  # flat matmul rate of the test profiles


def _cpu(**changes):
    return dataclasses.replace(flat_profile(tflops=MM_TFLOPS, backend="cpu"), **changes)


def _attention_block(tokens: int = 256) -> BlockSpec:
    """A 512² projection (2·512² FLOPs a token) and self-attention of 4·512 FLOPs per token pair."""
    return BlockSpec(name="dit.blocks.0", component="dit", tensors=(("w", (512, 512)),), tokens=tokens,
                     flops_per_token=2.0 * 512 * 512, self_attn_flops_per_token_pair=4.0 * 512)


def _compute(block: BlockSpec, profile, dtype: str = "fp32") -> float:
    return costs.compute_s(block, BlockPlan(block.name, "resident", "F32", dtype), profile, 0, False, "bf16", 1)


def test_attention_flops_cost_at_the_attention_rate():
    block = _attention_block()
    pair = 4.0 * 512 * 256 * 256
    token = 2.0 * 512 * 512 * 256
    slow = _cpu(attention_tflops={"fp32": Curve((16.0, 1024.0), (MM_TFLOPS / 2, MM_TFLOPS / 2))})
    assert _compute(block, slow) == pytest.approx(token / (MM_TFLOPS * 1e12) + pair / (MM_TFLOPS / 2 * 1e12))


def test_without_an_attention_curve_attention_costs_at_the_matmul_rate_as_before():
    block = _attention_block()
    flops = block.flops(0)
    assert _compute(block, _cpu()) == pytest.approx(flops / (MM_TFLOPS * 1e12))
    # a curve for another dtype changes nothing for this one
    other = _cpu(attention_tflops={"bf16": Curve((16.0,), (MM_TFLOPS / 10,))})
    assert _compute(block, other) == _compute(block, _cpu())


def test_attention_rate_is_read_at_the_calls_query_rows():
    curve = Curve((16.0, 256.0), (0.01, 0.04))
    profile = _cpu(attention_tflops={"fp32": curve})
    few, many = _attention_block(16), _attention_block(256)
    pair_s = [_compute(b, profile) - b.flops_per_token * b.tokens / (MM_TFLOPS * 1e12) for b in (few, many)]
    assert pair_s[0] == pytest.approx(4.0 * 512 * 16 * 16 / 0.01e12)
    assert pair_s[1] == pytest.approx(4.0 * 512 * 256 * 256 / 0.04e12)


def _vae_block() -> BlockSpec:
    """A 3×3 conv 32 → 16 channels (4608 kernel weights) and a 1×1 skip conv 32 → 16, over 1024 pixels, beside a
    linear 64 → 64: FLOPs shared among the three by elements."""
    tensors = (("conv.weight", (16, 32, 3, 3)), ("skip.weight", (16, 32, 1, 1)), ("proj.weight", (64, 64)),
               ("conv.bias", (16,)))
    return BlockSpec(name="vae.decoder.blocks.1", component="vae", tensors=tensors, tokens=1024,
                     flops_per_token=2.0 * (4608 + 512 + 4096))


CONV = Curve((512.0, 4608.0), (MM_TFLOPS / 8, MM_TFLOPS / 2))  # thin kernels slower, on log size between


def test_conv2d_kernels_cost_at_the_conv_rate_of_their_size_and_the_rest_at_the_matmul_rate():
    block = _vae_block()
    assert block.conv2d_kernels == (True, True, False)
    flops = 2.0 * 1024  # per element of any weight: FLOPs are shared by elements
    expected = (flops * 4608 / (MM_TFLOPS / 2) + flops * 512 / (MM_TFLOPS / 8) + flops * 4096 / MM_TFLOPS) / 1e12
    as_matmuls = flops * (4608 + 512 + 4096) / MM_TFLOPS / 1e12
    assert _compute(block, _cpu(conv_tflops={"fp32": CONV})) - _compute(block, _cpu()) == pytest.approx(
        expected - as_matmuls)


def test_without_a_conv_curve_for_the_dtype_convs_cost_as_matmuls_as_before():
    block = _vae_block()
    assert _compute(block, _cpu(conv_tflops={"bf16": CONV})) == _compute(block, _cpu())
    plain = BlockSpec(name="b", component="dit", tensors=(("w", (64, 64)),), tokens=16, flops_per_token=2.0 * 4096)
    assert plain.conv2d_kernels == (False,)
    assert _compute(plain, _cpu(conv_tflops={"fp32": CONV})) == _compute(plain, _cpu())


REWARM = Curve((256.0**2, 1024.0**2), (30.0, 250.0))


def test_cpu_charges_a_rewarm_per_weight_matrix_at_its_size():
    block = BlockSpec(name="b", component="dit", tensors=(("a", (1024, 1024)), ("b", (256, 256)), ("bias", (1024,))),
                      tokens=16, flops_per_token=0.0)
    before = _compute(block, _cpu())
    after = _compute(block, _cpu(matmul_rewarm_us=REWARM))
    assert after - before == pytest.approx((250.0 + 30.0) * 1e-6)  # the vector is no matmul


def test_a_gpu_or_an_unmeasured_profile_charges_no_rewarm():
    block = _attention_block()
    gpu = flat_profile(tflops=MM_TFLOPS)
    assert _compute(block, dataclasses.replace(gpu, matmul_rewarm_us=REWARM)) == _compute(block, gpu)
    assert costs.rewarm_s(block, _cpu()) == 0.0


# ---- the profile fields
@pytest.fixture
def doc() -> dict:
    return profile_to_dict(_cpu(provenance={k: p for k, p in flat_profile().provenance.items()}))


def _with_op_kinds(doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    doc.update(attention_tflops={"fp32": {"rows": [16, 256], "tflops": [0.06, 0.09], "spread": []}},
               conv_tflops={"fp32": {"kernel_elements": [576, 36864], "tflops": [0.012, 0.085], "spread": []}},
               matmul_rewarm_us={"weight_elements": [65536, 1048576], "us": [0.0, 250.0], "spread": []})
    doc["schema_version"] = 2
    return doc


def _provenance(doc: dict) -> dict:
    from residency.device.profile_io import PROVENANCE_FIELDS

    doc = copy.deepcopy(doc)
    doc["provenance"] = {k: {"kind": "measured", "source": "test", "derating": ""}
                         for k in (*PROVENANCE_FIELDS, "attention_tflops", "conv_tflops", "matmul_rewarm_us")}
    return doc


def test_op_kind_fields_round_trip_and_a_zero_rewarm_is_allowed(doc):
    full = _provenance(_with_op_kinds(doc))
    profile = profile_from_dict(full, "mem")
    assert profile.attention_tflops["fp32"].at(256) == 0.09
    assert profile.conv_tflops["fp32"].at(576) == 0.012
    assert profile.matmul_rewarm_us.at(65536) == 0.0
    assert profile_to_dict(profile) == full


def test_a_profile_without_them_loads_with_the_old_cost_model(doc):
    profile = profile_from_dict(_provenance(doc), "mem")
    assert profile.attention_tflops == {} and profile.conv_tflops == {} and profile.matmul_rewarm_us is None
    assert "attention_tflops" not in profile_to_dict(profile) and "conv_tflops" not in profile_to_dict(profile)


@pytest.mark.parametrize(("mutate", "field", "words"), [
    (lambda d: d["provenance"].pop("attention_tflops"), "provenance.attention_tflops", "missing"),
    (lambda d: d["attention_tflops"].update(fp64=d["attention_tflops"]["fp32"]), "attention_tflops.fp64", "not known"),
    (lambda d: d["matmul_rewarm_us"].update(us=[-1.0, 2.0]), "matmul_rewarm_us.us[0]", "≥ 0"),
    (lambda d: d["provenance"].pop("conv_tflops"), "provenance.conv_tflops", "missing"),
    (lambda d: d["conv_tflops"]["fp32"].pop("kernel_elements"), "conv_tflops.fp32.kernel_elements", "missing"),
    (lambda d: d["conv_tflops"]["fp32"].update(tflops=[0.0, 0.1]), "conv_tflops.fp32.tflops[0]", "must be positive"),
    (lambda d: d.update(schema_version=1), "attention_tflops", "schema_version 2"),
])
def test_bad_op_kind_fields_name_the_field(doc, mutate, field, words):
    bad = _provenance(_with_op_kinds(doc))
    mutate(bad)
    with pytest.raises(ResidencyError) as e:
        profile_from_dict(bad, "mem")
    assert f"'{field}'" in e.value.message and words in e.value.message


# ---- the CPU measurements, on a schedule small enough for a test
TINY = dataclasses.replace(measure_cpu.QUICK, matmul_dim=256, matmul_small_dim=64, matmul_point_s=0.02,
                           attention_rows=(16, 64), rewarm_repeats=5, conv_channels=((4, 2), (8, 8)))


def test_attention_is_measured_at_each_query_row_count():
    curve = measure_cpu.measure_attention("fp32", TINY)
    assert curve.x == (16.0, 64.0) and all(y > 0 for y in curve.y)


def test_conv_is_measured_at_each_kernel_size():
    curve = measure_cpu.measure_conv("fp32", TINY)
    assert curve.x == (2 * 4 * 9.0, 8 * 8 * 9.0) and all(y > 0 for y in curve.y)


def test_rewarm_is_measured_at_the_small_and_large_weight():
    curve = measure_cpu.measure_rewarm(TINY)
    assert curve.x == (64.0**2, 256.0**2) and all(y >= 0 for y in curve.y)
