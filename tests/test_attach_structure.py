"""Modules and parameters added to an attached model (diffusers' fuse_qkv_projections, an adapter, a replaced
weight): the next call is refused and detach warns; what the model's own forward registers is its business."""

from __future__ import annotations

import warnings

import pytest
import torch
from sim_helpers import flat_profile
from torch import nn

import residency
from residency.errors import ResidencyError
from residency.runtime import structure_watch

pytestmark = pytest.mark.usefixtures("one_compute_thread")


class Fusable(nn.Module):
    """Three projections a `fuse()` concatenates into a new layer, as diffusers' Attention.fuse_projections does."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(32, 32) for _ in range(3))

    def fuse(self) -> None:
        qkv = nn.Linear(32, 96)
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([self.q.weight, self.k.weight, self.v.weight]))
            qkv.bias.copy_(torch.cat([self.q.bias, self.k.bias, self.v.bias]))
        self.qkv = qkv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        return x + torch.tanh(q) * k.sigmoid() + v


def stack() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(*(Fusable() for _ in range(6))).eval(), torch.randn(4, 32)


def attach(model: nn.Module, x: torch.Tensor):
    return residency.attach(model, vram="40%", profile=flat_profile(backend="cpu"), backend="cpu", example_inputs=x)


def test_layers_fused_while_attached_refuse_the_next_call_and_detach_warns_naming_them():
    """fuse_qkv_projections() while attached read to_q/k/v from a shared slot: the fused weights held other blocks'
    values (off by up to 1.1) and detach left them so, with no error."""
    model, x = stack()
    rt = attach(model, x)
    assert rt.plan.streamed()
    with torch.inference_mode():
        model(x)
        for layer in model:
            layer.fuse()
        for _ in range(2):  # refused again: the model stays changed until detach
            with pytest.raises(ResidencyError, match=r"Sequential\.0\.qkv \(a submodule\) and 5 more were added to "
                                                     r"the model while attached") as e:
                model(x)
    assert "before attaching or after runtime.detach()" in e.value.hint
    with pytest.warns(UserWarning, match=r"Sequential\.0\.qkv \(a submodule\) and 5 more were added while the "
                                         r"model was attached, left as made"):
        rt.detach()
    assert not structure_watch._HANDLES and not structure_watch._WATCHES  # torch's global hooks removed
    fresh, _ = stack()
    for layer in fresh:
        layer.fuse()  # after detach: fused from the true weights, as a plain model fuses them
    with torch.inference_mode():
        assert torch.allclose(fresh(x), stack()[0](x), atol=1e-5)


def test_a_parameter_replaced_while_attached_is_named():
    model, x = stack()
    rt = attach(model, x)
    model[2].v.bias = nn.Parameter(torch.zeros(32))
    with pytest.raises(ResidencyError, match=r"Sequential\.2\.v\.bias \(a parameter\) was added"), \
            torch.inference_mode():
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rt.detach()


class LazyHead(nn.Module):
    """Builds a layer on its first call: the model's own registration, inside its call."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*(nn.Linear(32, 32) for _ in range(4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "scale"):
            self.scale = nn.Parameter(torch.ones(32), requires_grad=False)
        return self.body(x) * self.scale


def test_what_the_models_own_forward_registers_is_not_refused():
    torch.manual_seed(0)
    model, x = LazyHead().eval(), torch.randn(4, 32)
    expected = model(x)
    del model.scale  # planned from a model that has not built it yet
    rt = attach(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing to warn about at detach
        with torch.inference_mode():
            model(x)
            assert torch.equal(model(x), expected)
        rt.detach()


def test_a_model_attached_and_dropped_without_detach_is_collected():
    """The watch's global list held the runtime, and through it the model, for the life of the process; the copy
    thread and the runtime's torch thread count stayed too."""
    import gc
    import weakref

    def attached_then_dropped():
        model, x = stack()
        rt = attach(model, x)
        with torch.inference_mode():
            model(x)
        return weakref.ref(model), weakref.ref(rt)

    import threading
    import time

    before = torch.get_num_threads()
    model, rt = attached_then_dropped()
    gc.collect()
    assert model() is None and rt() is None
    assert not list(structure_watch._WATCHES)
    # and its backend, collected, gave the thread count back and ended its copy thread (both stayed for good)
    assert torch.get_num_threads() == before
    for _ in range(100):
        if not any(t.name == "residency-copy" for t in threading.enumerate()):
            break
        time.sleep(0.02)
    assert not any(t.name == "residency-copy" for t in threading.enumerate())


def test_a_layer_added_from_another_thread_while_a_call_runs_is_named():
    """Registrations while any call ran were taken for the model's own, whichever thread made them."""
    import threading

    model, x = stack()
    rt = attach(model, x)
    added = threading.Event()

    def add_layer(*_):
        if not added.is_set():
            t = threading.Thread(target=lambda: setattr(model[5], "extra", nn.Linear(2, 2)))
            t.start()
            t.join()
            added.set()

    handle = model[2].register_forward_pre_hook(add_layer)  # mid-call, on another thread
    with torch.inference_mode():
        model(x)
        handle.remove()
        with pytest.raises(ResidencyError, match=r"Sequential\.5\.extra \(a submodule\) was added"):
            model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rt.detach()
