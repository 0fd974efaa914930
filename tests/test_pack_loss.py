"""Packing measures each lossy tensor's real error against what the plan assumed for its format."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from residency.errors import PlanWarning
from residency.runtime.host_store import HostStore, pack_block
from residency.simulate.quality import format_error
from residency.workload import BlockSpec


def _spec() -> BlockSpec:
    return BlockSpec("blocks.0", "dit", (("lin.weight", (64, 256)), ("lin.bias", (64,))), tokens=16,
                     flops_per_token=2 * 64 * 256)


def _module(std: float) -> nn.Module:
    m = nn.Module()
    m.lin = nn.Linear(256, 64)
    with torch.no_grad():
        m.lin.weight.copy_(torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * std)
    return m


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K", "Q6_K", "NF4", "FP8", "BF16"])
def test_weights_of_ordinary_size_pack_within_the_assumed_loss(fmt):
    assert pack_block("blocks.0", _module(0.02), _spec(), fmt).excess == ()


def test_weights_too_small_for_the_format_are_named_with_their_loss():
    # weights far under fp16's finest step (6e-8), the format's smallest scale: at best nearly all zeros
    blob = pack_block("blocks.0", _module(1e-8), _spec(), "Q8_0")
    [e] = blob.excess
    assert (e.block, e.tensor, e.format) == ("blocks.0", "lin.weight", "Q8_0")
    assert e.assumed == format_error("Q8_0") and e.measured > 0.5 and e.rms == pytest.approx(1e-8, rel=0.1)


def test_the_attach_that_packs_them_warns_once_naming_them():
    m = _module(1e-8)
    store = HostStore("fp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store.build([("blocks.0", m, _spec(), "Q8_0", {"lin.weight": m.lin.weight, "lin.bias": m.lin.bias})])
        store.build([("blocks.0", m, _spec(), "Q8_0", {"lin.weight": m.lin.weight, "lin.bias": m.lin.bias})])
    said = [str(w.message) for w in caught if issubclass(w.category, PlanWarning)]
    assert len(said) == 1, said  # the second build reuses the cached blob: nothing packed, nothing said again
    assert "blocks.0.lin.weight in Q8_0 loses" in said[0] and "RMS 1.0e-08" in said[0]


@pytest.mark.parametrize("fmt", ["Q8_0", "Q6_K", "Q4_K"])
def test_outliers_that_take_their_neighbours_scales_are_named_though_the_tensors_error_is_small(fmt):
    # 0.2 % of the weights at 1000x the rest: they hold most of the tensor's norm, so its relative error is theirs
    # (small), while the weights sharing their blocks' scales round to nothing
    m = _module(0.02)
    with torch.no_grad():
        w = m.lin.weight
        w.view(-1)[::512] = 20.0
    whole = pack_block("blocks.0", m, _spec(), fmt)
    [e] = whole.excess
    assert e.tensor == "lin.weight" and e.measured > 3 * format_error(fmt)
    # the same count of large weights, but ordinary ones (no outliers): nothing to say
    with torch.no_grad():
        w.view(-1)[::512] = 0.05
    assert pack_block("blocks.0", m, _spec(), fmt).excess == ()
