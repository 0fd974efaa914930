"""Modules that read a streamed or packed block's weights without being the block: a submodule called on its own,
a head outside the attached model tied to one of its embeddings. Each computed on whatever another block had
left in the block's memory (off by 174 on the tied head, no error); now each call is one call of its block."""

from __future__ import annotations

import pytest
import torch
from test_attach_guards import attach, mlp_stack
from torch import nn

from residency.errors import ResidencyError
from residency.runtime.hooks import has_hook

pytestmark = pytest.mark.usefixtures("one_compute_thread")


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 64)
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(6))

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Body()
        self.head = nn.Linear(64, 64, bias=False)
        self.head.weight = self.body.emb.weight  # tied, as tie_word_embeddings does

    def forward(self, ids):
        return self.head(self.body(ids))


def test_a_head_outside_the_attached_body_tied_to_a_streamed_embedding_reads_the_embedding():
    torch.manual_seed(0)
    lm, ids = TiedLM().eval(), torch.randint(0, 64, (2, 16))
    with torch.inference_mode():
        expected = lm(ids)
    with attach(lm.body, ids) as rt, torch.inference_mode():
        assert rt.plan.by_name["Body.emb"].placement == "streamed"
        for _ in range(3):
            assert torch.equal(lm(ids), expected)
        assert torch.equal(lm.head(lm.body(ids)), expected)
    assert not has_hook(lm.head) and "forward" not in lm.head.__dict__


def test_submodules_of_streamed_blocks_called_on_their_own_compute_from_their_weights():
    model, x = mlp_stack()
    with torch.inference_mode():
        expected = [(layer[0](x), layer(x)) for layer in model]
        full = model(x)
    with attach(model, x, vram="60%") as rt, torch.inference_mode():
        assert rt.plan.streamed()
        model(x)
        for i in reversed(range(len(model))):  # against the schedule's order: each loads its block
            assert torch.equal(model[i][0](x), expected[i][0])
        assert torch.equal(model(x), full)  # the model's own calls are undisturbed
    assert not any(has_hook(m) for m in model.modules())


def test_a_module_outside_holding_weights_of_two_streamed_blocks_is_refused_by_name():
    model, x = mlp_stack()
    other = nn.Module()
    other.a, other.b = model[0][0].weight, model[1][0].weight  # nn.Module's setattr keeps Parameters
    with pytest.raises(ResidencyError, match="holds parameters of blocks Sequential.0, Sequential.1") as e:
        attach(model, x, vram="30%")
    assert "untie" in e.value.hint
    assert not any(has_hook(m) for m in model.modules())
