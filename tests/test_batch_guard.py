"""residency.batch_guard on plain modules: the batch read, the refusal, and methods put back as they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from residency.batch_guard import PlannedBatch, batch_guard, leading_dim, planned_batches
from residency.errors import ResidencyError


def test_the_batch_is_the_leading_dim_of_the_first_tensor_with_one():
    t0, x = torch.tensor(3.0), torch.zeros(4, 2)
    assert leading_dim((t0, x), {}) == 4
    assert leading_dim((), {"timestep": t0, "hidden_states": torch.zeros(2, 5)}) == 2
    assert leading_dim((1, "a", t0), {}) is None


def test_planned_batches_skip_a_component_without_a_tensor():
    inputs = {"enc": ((torch.zeros(2, 7),), {}, 1), "plain": ((3,), {}, 1)}
    assert planned_batches(inputs, {"enc": "forward", "plain": "forward"}) == {
        "enc": PlannedBatch("enc", "forward", 2)}


def test_a_larger_batch_is_refused_before_the_call_and_every_method_is_put_back():
    lin, vae = nn.Linear(3, 3), nn.Module()
    calls = []
    vae.decode = lambda z: calls.append(z.shape[0]) or z  # an instance attribute already: kept as it was
    own_decode = vae.__dict__["decode"]
    planned = {"lin": PlannedBatch("lin", "forward", 2), "vae": PlannedBatch("vae", "decode", 2)}
    modules = {"lin": lin, "vae": vae}
    with batch_guard(modules, planned):
        assert lin(torch.zeros(1, 3)).shape == (1, 3)  # smaller: runs
        vae.decode(torch.zeros(2, 1))
        with pytest.raises(ResidencyError, match="made for a batch of 2 through vae; this call runs 5"):
            vae.decode(torch.zeros(5, 1))
    assert calls == [2]
    assert "forward" not in lin.__dict__ and vae.__dict__["decode"] is own_decode
    with pytest.raises(ResidencyError), batch_guard(modules, planned):
        lin(torch.zeros(3, 3))
    assert "forward" not in lin.__dict__ and vae.__dict__["decode"] is own_decode
