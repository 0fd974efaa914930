"""A model's buffers through attach and detach: batch norm switched to training while attached (warned; its
statistics and counter given back as attach found them), a block's own integer state kept, a counter made under
inference_mode."""

from __future__ import annotations

import warnings

import pytest
import torch
from sim_helpers import flat_profile
from torch import nn

import residency
from residency.errors import InferenceOnlyWarning

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def attach(model, x, vram="40%"):
    return residency.attach(model, vram=vram, profile=flat_profile(backend="cpu"), backend="cpu", example_inputs=x)


def test_switching_a_batch_normed_model_to_training_while_attached_is_warned_once():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64)) for _ in range(4)]).eval()
    x = torch.randn(8, 64)
    with attach(model, x, vram=None), torch.inference_mode():
        with warnings.catch_warnings():
            warnings.simplefilter("error", InferenceOnlyWarning)
            model(x)  # eval: nothing to say
        model.train()
        with pytest.warns(InferenceOnlyWarning, match="put in training mode while attached"):
            model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error", InferenceOnlyWarning)
            model(x)  # said once
    # detach gives every batch norm back as attach found it: its statistics (not kept) and its batch counter,
    # which advanced in place on the CPU (statistics of 0 batches counted as of 3)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert all(m.num_batches_tracked.item() == 0 and not m.running_mean.any() for m in norms)


class _Counting(nn.Module):
    """A block with state of its own: a float sum and an integer count, both updated in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.register_buffer("total", torch.zeros(64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        y = self.lin(x)
        self.total.add_(y.detach().sum(0))
        self.count.add_(1)
        return y


def test_a_blocks_own_integer_state_is_kept_through_detach_as_its_float_state_is():
    """Putting back every integer buffer at detach (for batch norm's counter) rolled a block's own count back to 0
    while its float sum, kept as the runtime keeps a block's writes, stayed."""
    model, x = nn.Sequential(*[_Counting() for _ in range(4)]).eval(), torch.randn(8, 64)
    with attach(model, x, vram=None), torch.no_grad():
        for _ in range(3):
            model(x)
    assert [m.count.item() for m in model] == [3] * 4 and all(m.total.any() for m in model)


def test_a_batch_norm_counter_made_under_inference_mode_detaches():
    """Its counter was written back outside inference_mode: detach raised and left the model hooked for good."""
    with torch.inference_mode():
        model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64)) for _ in range(4)]).eval()
    for m in model.modules():  # the parameters again outside inference_mode, as its refusal says; buffers stay
        for name, p in list(m._parameters.items()):
            setattr(m, name, nn.Parameter(p.clone(), requires_grad=False))
    x = torch.randn(8, 64)
    with attach(model, x, vram=None), torch.inference_mode():
        model(x)
    with attach(model, x, vram=None):  # detached: it attaches again
        pass
