"""Workloads: bytes per format, KV bytes by hand, FLOPs, schedule, fingerprints, catalog validation."""

import copy
import json

import pytest
from sim_helpers import chain_workload, flat_profile

from pipelines.world_model import get_config
from pipelines.world_model.workload import catalog_entry
from residency.errors import ResidencyError
from residency.workload import workload_from_dict, workload_to_dict


@pytest.fixture(scope="module")
def lucid():
    return workload_from_dict(catalog_entry("lucid-500m"), "lucid-500m")


def test_kv_bytes_match_a_hand_computation(lucid):
    # 22 blocks × K and V × 12 frames × 220 tokens × 1024 channels × 2 bytes (bf16)
    assert lucid.kv_cache_bytes() == 22 * 2 * 12 * 220 * 1024 * 2
    assert lucid.kv_cache_bytes("fp8") == lucid.kv_cache_bytes() // 2
    assert lucid.kv_cache_bytes() == get_config("lucid-500m").kv_cache_bytes()


def test_bytes_per_format_follow_the_fallback_rule(lucid):
    block = lucid.by_name["dit.blocks.0"]
    vectors = sum(n for (_, s) in block.tensors if len(s) == 1 for n in s)
    matrices = block.params - vectors
    assert block.nbytes("BF16") == 2 * block.params
    assert block.nbytes("Q8_0") == matrices // 32 * 34 + 2 * vectors
    assert block.quantized_weights("Q8_0") == matrices


def test_parameters_match_the_pipeline(lucid):
    from pipelines.world_model import WorldModelPipeline

    pipe = WorldModelPipeline.from_config("lucid-500m", device="meta")
    assert lucid.params == sum(p.numel() for p in pipe.parameters())


def test_schedule_calls_dit_blocks_steps_plus_one_times_per_frame(lucid):
    assert lucid.calls_per_frame("dit.blocks.5") == 4 + 1
    assert lucid.calls_per_frame("dit.final") == 4
    assert lucid.calls_per_frame("vae.decoder.blocks.0") == 1
    assert lucid.calls_per_frame("vae.encoder.blocks.0") == 0
    assert lucid.with_params(steps=2).calls_per_frame("dit.blocks.5") == 3


def test_flops_grow_with_context(lucid):
    block = lucid.by_name["dit.blocks.0"]
    assert block.flops(12) > block.flops(1) > block.flops(0) > 0
    d, t = 1024, 220
    assert block.flops(12) - block.flops(11) == pytest.approx(4 * d * t * t)


def test_fingerprint_changes_with_a_block_shape():
    base = chain_workload(n=3)
    doc = workload_to_dict(base)
    changed = copy.deepcopy(doc)
    changed["blocks"][1]["tensors"][0][1] = [1024, 1025]
    assert workload_from_dict(doc).fingerprint() == base.fingerprint()
    assert workload_from_dict(changed).fingerprint() != base.fingerprint()
    assert base.with_params(steps=2).fingerprint() != base.fingerprint()


def test_profile_fingerprint_changes_with_a_number():
    assert flat_profile(link_gbps=10.0).fingerprint() != flat_profile(link_gbps=11.0).fingerprint()
    assert flat_profile(overlap=0.5).fingerprint() == flat_profile(overlap=0.5).fingerprint()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("blocks"), "missing field 'blocks'"),
        (lambda d: d.update(schema_version=9), "unknown version 9"),
        (lambda d: d["blocks"][0].update(tokens=0), "tokens"),
        (lambda d: d["blocks"][0].update(flops_per_token="many"), "flops_per_token"),
        # read, it predicted 9e21 ms a frame
        (lambda d: d["blocks"][0].update(flops_per_token=1e30), r"flops_per_token.*= 1e\+30: expected a number ≤"),
        (lambda d: d["blocks"][0].update(self_attn_flops_per_token_pair=1e12), "self_attn_flops_per_token_pair"),
        (lambda d: d["blocks"][0]["tensors"].append(["x", [2, -1]]), "tensors"),
        (lambda d: d["phases"][0]["passes"][0]["blocks"].append("nope"), "unknown blocks"),
    ],
)
def test_bad_catalog_documents_name_the_field(mutate, message):
    doc = json.loads(json.dumps(workload_to_dict(chain_workload(n=2))))
    mutate(doc)
    with pytest.raises(ResidencyError, match=message) as info:
        workload_from_dict(doc, "bad.json")
    assert "bad.json" in str(info.value)


def test_workload_round_trips_through_json():
    w = chain_workload(n=3, steps=2)
    again = workload_from_dict(json.loads(json.dumps(workload_to_dict(w))))
    assert again.fingerprint() == w.fingerprint()
    assert again.flops_per_frame() == w.flops_per_frame()
