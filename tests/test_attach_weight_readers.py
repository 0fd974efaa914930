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


def test_the_whole_models_state_dict_gives_the_tied_heads_original_weight_while_the_body_is_attached():
    """Hooked only on the attached body, the head's state_dict() entry was whatever another block had left in the
    shared slot (off by 1.04 on a Llama): a checkpoint saved while attached was corrupt, with no warning."""
    torch.manual_seed(0)
    lm, ids = TiedLM().eval(), torch.randint(0, 64, (2, 16))
    saved = {k: v.clone() for k, v in lm.state_dict().items()}
    with attach(lm.body, ids) as rt, torch.inference_mode():
        assert rt.plan.by_name["Body.emb"].placement == "streamed"
        lm(ids)
        lm.body(ids)  # the last layer's bytes now in the slots the embedding shares
        got = lm.state_dict()
        assert got.keys() == saved.keys()
        assert all(torch.equal(got[k], saved[k]) for k in saved)
        with pytest.raises(ResidencyError):
            lm.load_state_dict(saved)  # it would write into the runtime's slots
    lm.load_state_dict(saved)  # after detach: allowed


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


def test_a_tied_heads_calls_leave_the_schedule_and_the_frames_as_the_model_alone_makes_them():
    """Each head call was taken for the next frame's first call: 10 frames of 7, 1, 7, 1… calls for 5 calls."""
    torch.manual_seed(0)
    lm, ids = TiedLM().eval(), torch.randint(0, 64, (2, 16))
    with attach(lm.body, ids) as rt, torch.inference_mode():
        for _ in range(5):
            lm(ids)
        rt._executor.close_frame()
        assert rt._executor.resyncs == 0 and rt._executor.out_of_schedule_calls == 5
        assert [len(f.blocks) for f in rt.recorder.frames] == [len(rt.plan.blocks)] * 5


def test_a_reader_call_that_fails_to_load_leaves_later_calls_right():
    """The depth was raised before the load, which a budget cut failed: every later call was bypassed (off by 109)."""
    torch.manual_seed(0)
    lm, ids = TiedLM().eval(), torch.randint(0, 64, (2, 16))
    with torch.inference_mode():
        expected, hidden = lm(ids), lm.body(ids)
    with attach(lm.body, ids) as rt, torch.inference_mode():
        lm(ids)
        full = rt.ledger.budget_bytes
        rt.set_budget(rt.ledger.total_bytes - 1)
        with pytest.raises(ResidencyError):
            lm.head(hidden)
        rt.set_budget(full)
        assert torch.equal(lm.head(hidden), expected)


def test_a_reader_called_from_another_thread_during_a_model_call_waits_for_it():
    """depth was the other thread's: a call from a second thread while a block ran was bypassed (off by 2.68)."""
    import threading

    model, x = mlp_stack()
    with torch.inference_mode():
        expected = model[4][0](x)
    got, inside = [], threading.Event()
    with attach(model, x, vram="60%"), torch.inference_mode():
        def probe(module, args):  # runs inside block 2's call (depth 1) on the main thread
            if not inside.is_set():
                inside.set()
                worker = threading.Thread(target=lambda: got.append(model[4][0](x)))
                worker.start()
                worker.join(0.2)  # it waits for the unit lock: not done while this call runs
                got.append(worker)
        handle = model[2][0].register_forward_pre_hook(probe)
        model(x)
        handle.remove()
        got[0].join(10)
    assert torch.equal(got[1], expected)


def test_a_parameter_list_of_the_models_weights_elsewhere_is_no_reader():
    """An EMA helper's nn.ParameterList(model.parameters()) made attach refuse ('holds parameters of blocks …')."""
    model, x = mlp_stack()
    keep = nn.ParameterList(model.parameters())
    with torch.inference_mode():
        expected = model(x)
    with attach(model, x, vram="30%"), torch.inference_mode():
        assert torch.equal(model(x), expected)
    assert not has_hook(keep) and "forward" not in keep.__dict__
