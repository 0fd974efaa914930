"""A streamed block unpacks from the slot its packed bytes were just copied into, which is in the cache: the profile's
dequant_fresh_factor (measurement version 12; 13: the copy thread makes the copy) prices that unpack, and nothing else."""

from __future__ import annotations

import dataclasses

import pytest
from sim_helpers import assert_profile_refused, flat_profile, matrices_and_vectors_block, shipped_doc_with

from residency.device import profile_from_dict, profile_to_dict
from residency.device.profile_io import SCHEMA_2_FIELDS
from residency.plan import BlockPlan, Execution
from residency.simulate.costs import call_cost, dequant_s, unpacks_fresh

KEY = "dequant_fresh_factor"
BLOCK = matrices_and_vectors_block([(512, 512)] * 4, [512] * 6)


def _profile(**factors):
    return dataclasses.replace(flat_profile(dequant_gw=0.5, backend="cpu"), dequant_fresh_factor=factors)


def test_only_a_streamed_block_unpacking_on_compute_reads_a_fresh_slot():
    assert unpacks_fresh(BlockPlan("b", "streamed", "Q8_0", "fp32"))
    assert not unpacks_fresh(BlockPlan("b", "streamed", "Q8_0", "fp32", dequant_on="copy"))  # from the host blob
    assert not unpacks_fresh(BlockPlan("b", "resident-quantized", "Q8_0", "fp32"))


def test_each_format_of_a_fresh_unpack_takes_its_own_factor():
    plain = _profile()
    fresh = _profile(Q8_0=0.8, BF16=0.5)
    cold = dequant_s(BLOCK, "Q8_0", "fp32", plain)
    vectors = cold - dequant_s(dataclasses.replace(BLOCK, tensors=BLOCK.tensors[:4]), "Q8_0", "fp32", plain)
    assert dequant_s(BLOCK, "Q8_0", "fp32", fresh) == pytest.approx(cold)  # not fresh: as measured from DRAM
    assert dequant_s(BLOCK, "Q8_0", "fp32", fresh, fresh=True) == pytest.approx(0.8 * (cold - vectors) + 0.5 * vectors)
    assert dequant_s(BLOCK, "Q8_0", "fp32", plain, fresh=True) == pytest.approx(cold)  # not measured: 1.0


@pytest.mark.parametrize(("placement", "dequant_on", "factor"), [
    ("streamed", "compute", 0.7), ("streamed", "copy", 1.0), ("resident-quantized", "compute", 1.0)])
def test_a_calls_dequant_is_fresh_where_its_bytes_were_just_copied(placement, dequant_on, factor):
    fresh = _profile(Q8_0=0.7, BF16=0.7)
    bp = BlockPlan("dit.blocks.0", placement, "Q8_0", "fp32", dequant_on=dequant_on)
    got = call_cost(BLOCK, bp, fresh, Execution(), 0, False, "bf16", 1).dequant_s
    assert got == pytest.approx(factor * dequant_s(BLOCK, "Q8_0", "fp32", _profile()))


def test_the_factor_round_trips_and_an_older_profile_keeps_its_fingerprint():
    doc = shipped_doc_with(KEY, {"Q8_0": 0.9, "BF16": 0.75})
    profile = profile_from_dict(doc, "mem")
    assert profile.dequant_fresh_factor == {"Q8_0": 0.9, "BF16": 0.75}
    assert profile_from_dict(profile_to_dict(profile), "again") == profile
    without = dataclasses.replace(profile, dequant_fresh_factor={})
    assert KEY not in profile_to_dict(without) and without.fingerprint() != profile.fingerprint()


@pytest.mark.parametrize(("value", "field", "words"), [
    ({"Q8_0": 1.5}, f"{KEY}.Q8_0", "at most 1"),
    ({"Q8_0": 0.0}, f"{KEY}.Q8_0", "must be positive"),
    ({"Q8_0": "0.9"}, f"{KEY}.Q8_0", "a fraction of the time from DRAM"),
    ({"Q9_9": 0.9}, f"{KEY}.Q9_9", "not known"),
    ([0.9], KEY, "JSON object"),
])
def test_a_bad_factor_names_the_field(value, field, words):
    assert_profile_refused(shipped_doc_with(KEY, value), field, words)


def test_a_factor_needs_its_provenance_and_schema_2():
    doc = shipped_doc_with(KEY, {"Q8_0": 0.9})
    doc["provenance"].pop(KEY)
    assert_profile_refused(doc, f"provenance.{KEY}", "missing")
    doc = shipped_doc_with(KEY, {"Q8_0": 0.9})
    for k in SCHEMA_2_FIELDS:
        if k != KEY:
            doc.pop(k, None)
    doc["schema_version"] = 1
    assert_profile_refused(doc, KEY, "needs schema_version 2")


def test_the_probe_copies_the_fresh_slot_on_the_copy_engine():
    # the runtime's loads are the copy thread's, on the other core: a slot copied by the timing thread itself sat in
    # its own cache and timed a fresher input than a streamed block ever gets
    import threading

    import torch

    from residency.device.measure_cpu_dequant import fresh_input_factor

    timing_thread = threading.get_ident()
    copied_on: list[int] = []

    class Engine:
        def submit(self, job):
            t = threading.Thread(target=lambda: (copied_on.append(threading.get_ident()), job()))
            t.start()
            t.join()
            return len(copied_on)

        def wait(self, ticket):
            return None

    packed = torch.arange(64, dtype=torch.uint8)
    seen: list[torch.Tensor] = []
    copies = iter([packed + i for i in range(100)])
    factor = fresh_input_factor(lambda src: seen.append(src.clone()), copies, packed, 15, Engine())
    assert len(copied_on) == 15 and timing_thread not in copied_on
    assert 0.2 <= factor <= 1.0
    # every other unpack reads the slot, holding the copy the engine made just before it
    assert all(torch.equal(seen[2 * k + 1], packed + 2 * k + 1) for k in range(15))


def test_the_probe_unpacks_into_outputs_the_caches_no_longer_hold():
    from residency.device.measure_cpu_dequant import OUTPUT_RING_BYTES, output_ring

    ring = output_ring(256, 1024)  # 1 MiB each: 8 of them
    first = [next(ring) for _ in range(OUTPUT_RING_BYTES // 2**20)]
    assert len({t.data_ptr() for t in first}) == len(first) and next(ring).data_ptr() == first[0].data_ptr()
    big = output_ring(2048, 2048)  # 16 MiB: one, rewritten by every call
    assert next(big).data_ptr() == next(big).data_ptr() and next(big).shape == (2048, 2048)
