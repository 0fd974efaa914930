"""The runtime is for inference: where the plan swaps weights in, a call with autograd on runs without it (warned),
since streamed weights share slots a backward pass would read back wrong, and an input that requires grad is refused
— for the model's calls, a block called on its own, and each thread; with every block resident autograd is left
alone."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from sim_helpers import flat_profile
from test_attach_guards import attach, mlp_stack
from torch import nn

import residency
from residency.errors import InferenceOnlyWarning, ResidencyError

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def test_a_call_with_autograd_on_runs_without_it_and_says_so():
    model, x = mlp_stack()
    with torch.inference_mode():
        expected = model(x)
    with attach(model, x) as rt:
        assert rt.plan.streamed()
        with pytest.warns(InferenceOnlyWarning, match="ran without autograd"):
            y = model(x)
        assert not y.requires_grad and torch.equal(y, expected)
        with pytest.raises(RuntimeError):  # torch's own error: no graph, so no wrong gradients
            y.sum().backward()


def test_an_input_that_requires_grad_is_refused_where_the_plan_swaps_weights():
    # the same code works where every block stays resident (below); here the backward would fail in torch, so the
    # call says why at once, before anything runs
    model, x = mlp_stack()
    with attach(model, x) as rt:
        assert rt.plan.streamed()
        with pytest.raises(ResidencyError, match="an input of this call requires grad") as err:
            model(x.clone().requires_grad_())
        assert "keeps every block resident" in err.value.hint
        h = nn.Linear(64, 64)(x)  # computed with autograd on outside: plain inference, warned as before, not refused
        with pytest.warns(InferenceOnlyWarning):
            model(h)
        with torch.no_grad():  # no autograd asked for: it runs
            y = model(x.clone().requires_grad_())
    with torch.no_grad():
        assert torch.equal(y, model(x))


def test_a_block_called_on_its_own_with_autograd_on_is_guarded_as_the_models_call_is():
    # a user's own loop over the layers: autograd kept each streamed layer's slot for a backward the next layer's
    # copy had overwritten (input gradients off by more than their size, no warning)
    model, x = mlp_stack()
    with attach(model, x) as rt:
        assert rt.plan.streamed()
        with pytest.raises(ResidencyError, match="an input of this call requires grad"):
            model[0](x.clone().requires_grad_())
        h = nn.Linear(64, 64)(x)  # requires grad, computed outside: warned, run without autograd
        with pytest.warns(InferenceOnlyWarning, match="ran without autograd"):
            y = model[0](h)
        assert not y.requires_grad and torch.is_grad_enabled()
        with torch.inference_mode():
            expected = model(x)
            y = x
            for layer in model:  # the loop itself, no autograd asked for: the model's own outputs
                y = layer(y)
        assert torch.equal(y, expected)


def test_autograd_comes_back_on_for_each_thread_whose_block_call_turned_it_off():
    # two threads inside one block's forward at once: a shared record of who turned it off left one thread without
    # autograd for good and the other's call unguarded
    class Waiting(nn.Module):
        barrier: threading.Barrier | None = None  # armed once attached (the attach traces the model alone)

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)

        def forward(self, x):
            if Waiting.barrier is not None:
                Waiting.barrier.wait(timeout=10)  # both threads are inside the hooked call here
            return self.lin(x)

    torch.manual_seed(0)
    model = nn.Sequential(*[Waiting() for _ in range(4)]).eval()
    x = torch.randn(4, 64)
    seen = {}

    def call(key):
        h = nn.Linear(64, 64)(x)  # requires grad: run without autograd, warned
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InferenceOnlyWarning)
            y = model[1](h)
        seen[key] = (y.requires_grad, torch.is_grad_enabled())

    with attach(model, x) as rt:
        assert rt.plan.streamed()
        Waiting.barrier = threading.Barrier(2)
        threads = [threading.Thread(target=call, args=(k,)) for k in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert seen == {"a": (False, True), "b": (False, True)}


def test_with_every_block_resident_autograd_is_left_alone():
    model, x = mlp_stack()
    with attach(model, x, vram=None) as rt:
        assert not rt.plan.streamed()
        y = model(x)
        assert y.requires_grad
        y.sum().backward()
    assert model[0][0].weight.grad is not None


def test_a_recovery_into_streaming_mid_call_turns_autograd_off_for_the_retry():
    model, x = mlp_stack()
    with attach(model, x, vram=None) as rt:
        assert not rt.plan.streamed()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        rt.set_budget(int(0.4 * weights))  # another program took the memory: the next call recovers, streaming
        with pytest.warns(InferenceOnlyWarning):
            y = model(x)
        assert rt.plan.streamed() and not y.requires_grad


def test_a_world_model_rollout_steps_without_autograd_and_without_a_warning():
    import warnings

    import numpy as np

    from pipelines.world_model import WorldModelPipeline

    pipe = WorldModelPipeline.from_config("tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error", InferenceOnlyWarning)  # a rollout never trains: nothing to warn of
        with residency.attach(pipe, vram="50%", profile=flat_profile(backend="cpu"), backend="cpu") as rt:
            assert rt.plan.streamed()
            session = pipe.start(np.zeros((64, 64, 3), np.uint8))
            frames = [rt.step(session, action) for action in ("right", "up")]
    assert len(frames) == 2
