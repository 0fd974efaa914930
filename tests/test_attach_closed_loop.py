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


def test_a_gpu_profile_on_the_cpu_backend_is_refused_for_the_loop_and_the_model_left_as_it_was():
    """Fitted to CPU timings a GPU profile describes neither device: the loop read its copy engine 4x slow and
    switched BF16 blocks to Q5_K. Refused (the CLI's --calibrate was already); without the loop it attaches."""
    from residency.runtime.hooks import has_hook

    model = Small()
    gpu = flat_profile(backend="cuda")
    with pytest.raises(residency.ResidencyError, match="a GPU profile"):
        residency.attach(model, vram="1GiB", profile=gpu, backend="cpu", example_inputs=X, closed_loop=True)
    assert not any(has_hook(m) for m in model.modules())
    with residency.attach(model, vram="1GiB", profile=gpu, backend="cpu", example_inputs=X,
                          closed_loop=LoopOptions(enabled=False)) as rt:
        assert rt.loop is None or not rt.loop.options.enabled


def test_a_plan_made_for_another_profile_is_refused_for_the_loop_naming_both_profiles():
    from residency.runtime.hooks import has_hook

    with attach_small() as rt:
        plan = rt.plan  # made for flat_profile(backend="cpu")
    model, other = Small(), flat_profile(backend="cpu", link_gbps=3.0, name="slower link")
    with pytest.raises(residency.ResidencyError, match=f"made for profile {plan.profile!r}") as err:
        residency.attach(model, plan=plan, profile=other, backend="cpu", example_inputs=X, closed_loop=True)
    assert "leave plan= out" in err.value.hint  # was "the runtime needs replan=…": attach through residency.attach
    assert not any(has_hook(m) for m in model.modules())
    with residency.attach(model, plan=plan, profile=other, backend="cpu", example_inputs=X,
                          closed_loop=LoopOptions(enabled=False)):
        pass  # without the loop it runs the plan as given


@pytest.mark.parametrize("value", ["yes", {"max_switches": 2}, 1])
def test_a_wrong_closed_loop_value_is_refused_and_leaves_the_model_as_it_was(value):
    from residency.runtime.hooks import has_hook

    model = Small()
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(residency.ResidencyError, match="give True, False or a LoopOptions"):
        residency.attach(model, vram="40%", profile=flat_profile(backend="cpu"), backend="cpu", example_inputs=X,
                         closed_loop=value)
    assert not any(has_hook(m) for m in model.modules())
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    with residency.attach(model, vram="40%", profile=flat_profile(backend="cpu"), backend="cpu",
                          example_inputs=X) as rt:  # attachable again
        assert torch.equal(rt.pipeline(X), Small()(X))


def test_enable_loop_detaches_an_attached_runtime_before_raising_for_a_wrong_value():
    from residency.runtime.closed_loop import enable_loop
    from residency.runtime.hooks import has_hook

    model = Small()
    rt = residency.attach(model, vram="40%", profile=flat_profile(backend="cpu"), backend="cpu", example_inputs=X)
    with pytest.raises(residency.ResidencyError, match="give True, False or a LoopOptions"):
        enable_loop(rt, "on")
    assert not any(has_hook(m) for m in model.modules())
