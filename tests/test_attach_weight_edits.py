"""Edits of an attached model's weights: an in-place edit, a replaced `.data` or a write into what state_dict
returned refuses the next call (the plan's copies were made at attach: a streamed block saw such an edit in one
call or none) and detach undoes it; the model's own in-place updates in its forward and a block called directly
are no edits."""

from __future__ import annotations

import pytest
import torch
from test_attach_guards import attach, mlp_stack
from torch import nn

from residency.errors import ResidencyError

pytestmark = pytest.mark.usefixtures("one_compute_thread")


@pytest.mark.parametrize("vram", [None, "40%"])
def test_an_in_place_edit_of_a_weight_while_attached_refuses_the_next_call_and_detach_undoes_it(vram):
    """Resident, the edit was seen by every later call; streamed, by one call or none as the copy race went."""
    model, x = mlp_stack()
    weight = model[0][0].weight.detach().clone()
    with attach(model, x, vram=vram) as rt, torch.inference_mode(False), torch.no_grad():
        assert bool(rt.plan.streamed()) == (vram is not None)
        model(x)
        model[0][0].weight.mul_(0)
        with pytest.raises(ResidencyError, match=r"weight was changed in place while attached") as info:
            model(x)
        assert "after runtime.detach()" in info.value.hint
    assert torch.equal(model[0][0].weight, weight)


@pytest.mark.parametrize("vram", [None, "40%"])
def test_replacing_a_weights_data_while_attached_refuses_the_next_call(vram):
    """`weight.data = …` keeps the version counter: a streamed block saw the new tensor on one call and its slot on
    the next (two identical calls disagreed)."""
    model, x = mlp_stack()
    with attach(model, x, vram=vram) as rt, torch.inference_mode(False), torch.no_grad():
        assert bool(rt.plan.streamed()) == (vram is not None)
        model(x)
        model[0][0].weight.data = torch.zeros_like(model[0][0].weight)
        with pytest.raises(ResidencyError, match=r"weight was replaced \(weight.data = …\) while attached"):
            model(x)


def test_writing_into_what_state_dict_returned_while_attached_refuses_the_next_call():
    """state_dict() gives the original tensors; an in-place write there (an EMA update) was seen by no call and
    kept by detach."""
    model, x = mlp_stack()
    with attach(model, x, vram="40%"), torch.inference_mode(False), torch.no_grad():
        model(x)
        for v in model.state_dict().values():
            v.zero_()
        with pytest.raises(ResidencyError, match=r"written through the tensor state_dict\(\) returned"):
            model(x)


def test_a_block_called_directly_between_model_calls_is_no_edit():
    """A direct call of one block rebinds its weights outside a call of the model: not a `.data` replacement."""
    model, x = mlp_stack()
    with attach(model, x, vram="40%") as rt, torch.inference_mode(False), torch.no_grad():
        assert rt.plan.streamed()
        model(x)
        model[1](model[0](x))
        model(x)


def test_a_forward_hook_added_to_a_streamed_block_after_attach_reads_that_blocks_weight():
    """Torch runs it after our wrapper: the slot had been handed to the next block's load, and the hook read
    another block's weight."""
    model, x = mlp_stack()
    expected = [float(model[i][0].weight.norm()) for i in range(6)]
    with attach(model, x) as rt, torch.inference_mode():
        assert len(rt.plan.streamed()) >= 2
        seen = []

        def read_weight(mod, args, out) -> None:
            rt.backend.drain()  # the copy engine finishes what the call queued: the race it may win, made certain
            seen.append(float(mod[0].weight.norm()))

        for i in range(6):
            model[i].register_forward_hook(read_weight)
        model(x)
        model(x)
    assert seen == expected * 2


def test_a_models_own_in_place_update_of_a_weight_in_its_forward_is_not_an_edit():
    """nn.Embedding(max_norm=…) renormalises its rows in place in its forward: every call after the first was
    refused as an edit."""
    torch.manual_seed(0)

    class Renormed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 64, max_norm=1.0)
            self.layers = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])

        def forward(self, ids):
            return self.layers(self.emb(ids))

    model, ids = Renormed().eval(), torch.randint(0, 50, (2, 5))
    with attach(model, ids, vram=None), torch.inference_mode(False), torch.no_grad():
        for _ in range(3):
            model(ids)


def test_an_edit_then_a_plan_switch_is_refused_not_taken_as_the_new_baseline():
    model, x = mlp_stack()
    with attach(model, x, vram=None) as rt, torch.inference_mode(False), torch.no_grad():
        model(x)
        model[0][0].weight.mul_(0)
        with pytest.raises(ResidencyError, match="changed in place while attached"):
            rt.switch_plan(rt.plan)
        with pytest.raises(ResidencyError, match="changed in place while attached"):
            model(x)
