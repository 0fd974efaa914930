"""residency.attach(closed_loop=…): off by default, on with True or a LoopOptions (capped, or disabled)."""

from __future__ import annotations

import pytest
import torch
from sim_helpers import flat_profile
from torch import nn

import residency
from residency.runtime.closed_loop import LoopOptions

pytestmark = pytest.mark.usefixtures("one_compute_thread")

DIM = 32
X = torch.randn(2, DIM, generator=torch.Generator().manual_seed(1))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        return x


def attach_small(**options):
    return residency.attach(Small(), vram="100%", profile=flat_profile(backend="cpu"), backend="cpu",
                            example_inputs=X, **options)


def test_the_loop_is_off_unless_asked():
    with attach_small() as rt:
        assert rt.loop is None
    with attach_small(closed_loop=False) as rt:
        assert rt.loop is None


def test_true_takes_the_default_options_and_a_loop_options_caps_or_disables_it():
    with attach_small(closed_loop=True) as rt:
        assert rt.loop.options == LoopOptions()
        rt.pipeline(X)  # a forward is one unit of the loop
        assert rt.loop.units == 1
    capped = LoopOptions(max_switches=1)
    with attach_small(closed_loop=capped) as rt:
        assert rt.loop.options is capped
    with attach_small(closed_loop=LoopOptions(enabled=False)) as rt:
        for _ in range(3):
            rt.pipeline(X)
        assert rt.loop.events == []
