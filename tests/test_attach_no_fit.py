"""What attach refuses and what it runs: a no-fit error of a peer's policy asked for by name quotes that policy's
need, not residency's own planner's (all-resident's error quoted 1.13 MiB, the one-block-at-a-time plan's, under a
3.21 MiB budget); a call's tensor of fewer dimensions than the example's runs where no larger."""

from __future__ import annotations

import re

import pytest
import torch
from sim_helpers import flat_profile
from test_attach_guards import mlp_stack
from torch import nn

import residency
from residency.errors import PlanWarning, ResidencyError
from residency.units import parse_size

pytestmark = pytest.mark.usefixtures("one_compute_thread")


@pytest.mark.parametrize("policy", ["all-resident", "diffusers-model-offload"])
def test_a_named_policy_that_does_not_fit_quotes_its_own_need_and_that_need_fits(policy):
    model, x = mlp_stack()
    kw = dict(profile=flat_profile(backend="cpu"), backend="cpu", example_inputs=x, policy=policy)
    with pytest.raises(ResidencyError) as e:
        residency.attach(model, vram="40%", **kw)
    budget = int(re.search(r"fits vram=(\d+) bytes", e.value.message).group(1))
    need = re.search(r"give vram='([^']+)' or more", e.value.hint).group(1)
    assert parse_size(need) > budget, e.value
    assert f"leave policy='{policy}' out" in e.value.hint and "slot" not in e.value.hint
    with torch.inference_mode(), residency.attach(model, vram=need, **kw) as rt:
        assert rt.plan.policy == policy


def test_a_tensor_of_fewer_dimensions_no_larger_than_the_examples_trailing_ones_runs():
    """A 0-d timestep (what a scheduler loop yields) was refused where the example's was one per sample."""
    from residency.front_door.shape_guard import ShapeGuard

    guard = ShapeGuard("UNet", ("sample", "timestep"), (("sample", ((2, 4, 8, 8),)), ("timestep", ((2,),))))
    guard((torch.zeros(2, 4, 8, 8), torch.tensor(500.0)), {})
    guard((torch.zeros(4, 8, 8), torch.ones(2)), {})  # unbatched
    for args, why in [((torch.zeros(2, 4, 8, 8), torch.ones(2, 1)), "2 dimension"),
                      ((torch.zeros(4, 16, 8), torch.ones(2)), "16 against 8 in dimension 2")]:
        with pytest.raises(ResidencyError, match=why):
            guard(args, {})


class GainStack(nn.Module):
    """Eight layers that all hold one small shared gain: tied, so planned as one block."""

    def __init__(self):
        super().__init__()
        gain = nn.Parameter(torch.ones(64))
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(8))
        for layer in self.layers:
            layer.gain = gain

    def forward(self, x):
        for layer in self.layers:
            x = layer(x) * layer.gain
        return x


def test_a_small_tensor_shared_by_every_layer_is_named_where_it_makes_them_one_block():
    """All eight layers became one block, 'Stack.layers.0', of 8× its size; nothing named the 256-byte tensor."""
    model, x = GainStack().eval(), torch.randn(2, 64)
    kw = dict(profile=flat_profile(backend="cpu"), backend="cpu", example_inputs=x)
    with pytest.warns(PlanWarning, match=r"8 modules \(layers.0 … layers.7\) share layers.0.gain \(256 B\)"), \
            pytest.raises(ResidencyError) as e:
        residency.attach(model, vram="60%", **kw)
    assert "8 modules, layers.0 … layers.7, planned as one)" in e.value.hint


class CountingLayers(nn.Module):
    """Each layer's float buffer updated after the layer returns: read outside its call, so every block is pinned."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))
        for layer in self.layers:
            layer.register_buffer("seen", torch.zeros(64))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
            layer.seen.add_(1.0)
        return x


def test_blocks_that_must_stay_resident_are_named_in_the_no_fit_error_and_in_the_plan_notes():
    model, x = CountingLayers().eval(), torch.randn(2, 64)
    kw = dict(profile=flat_profile(backend="cpu"), backend="cpu", example_inputs=x)
    with pytest.raises(ResidencyError) as e:
        residency.attach(model, vram="40%", **kw)
    assert "4 blocks (CountingLayers.layers.0, CountingLayers.layers.1, CountingLayers.layers.2 and 1 more" in e.value.message
    assert "must stay resident whatever the plan: the model reads its tensors outside its calls" in e.value.message
    assert "cannot stream: the model reads their tensors outside their own calls" in e.value.hint
    with residency.attach(model, vram="400%", **kw) as rt:  # resident anyway: the plan still says why they must be
        assert any("kept resident for the session whatever the budget" in n for n in rt.plan.notes)


class ReadsAnotherLayer(nn.Module):
    """layers.0's weight read again by the model's own code after layer 2; a loose gate makes a second pinned block
    (the root's tensors) with another reason."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(128, 128) for _ in range(4))
        self.gate = nn.Parameter(torch.randn(128))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = torch.tanh(layer(x)) * self.gate
            if i == 2:
                x = x + nn.functional.linear(x, self.layers[0].weight)
        return x


def test_each_pinned_block_is_given_its_own_reason_and_the_slot_hint_names_a_block_that_streams():
    # the first block's reason was said of all ("the runtime reads them all through the call" of layers.0, which
    # the model reads outside its call), and the hint's "largest block … needs a slot" named that pinned block
    model, x = ReadsAnotherLayer().eval(), torch.randn(2, 128)
    kw = dict(profile=flat_profile(backend="cpu"), backend="cpu", example_inputs=x)
    with pytest.raises(ResidencyError) as e:
        residency.attach(model, vram="50%", **kw)
    msg = e.value.message
    assert "ReadsAnotherLayer.layers.0: the model reads its tensors outside its calls" in msg
    assert "ReadsAnotherLayer.loose: " in msg
    assert "its largest block, ReadsAnotherLayer.layers.0" not in e.value.hint
    assert "its largest block, ReadsAnotherLayer.layers." in e.value.hint
